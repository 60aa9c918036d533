"""drove-agent: an executor agent for the Drove container orchestrator."""

from __future__ import annotations

__version__ = "0.1.0"

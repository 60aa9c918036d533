"""A small blocking client of the agent's own API, for the operator commands."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.config import Config


class ClientError(Exception):
    """One line an operator can act on."""


@dataclass(frozen=True, slots=True)
class AgentClient:
    url: str
    secret: str
    config_hint: str = ""
    timeout_s: float = 10.0

    @classmethod
    def from_config(cls, cfg: Config, config_path: str = "") -> AgentClient:
        host = cfg.server.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(
            f"http://{host}:{cfg.server.port}", cfg.cluster_auth.controller_secret, config_path
        )

    def _request(self, method: str, path: str, body: Any = None, stream: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Cluster-Authorization", self.secret)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            resp = urllib.request.urlopen(req, timeout=None if stream else self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                where = f" in {self.config_hint}" if self.config_hint else ""
                raise ClientError(
                    f"the agent at {self.url} refused the secret (HTTP 401); "
                    f"check clusterAuth.secrets{where}"
                ) from None
            raw = exc.read()
            try:
                message = json.loads(raw).get("message") or raw.decode()
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")
            raise ClientError(f"{method} {path}: HTTP {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"no agent answers at {self.url} ({reason}); is it running?"
            ) from None
        except (ConnectionError, TimeoutError) as exc:
            raise ClientError(f"no agent answers at {self.url} ({exc}); is it running?") from None
        if stream:
            return resp
        with resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def task(self, instance_id: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.get(f"/apis/v1/tasks/{instance_id}")
        except ClientError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise
        return found

    def events(self) -> Iterator[dict[str, Any]]:
        """Server-Sent Events from /apis/v1/events, one decoded message at a time."""
        resp = self._request("GET", "/apis/v1/events", stream=True)
        with resp:
            data: list[str] = []
            for raw in resp:
                line = raw.decode().rstrip("\n").rstrip("\r")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

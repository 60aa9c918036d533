"""Materialise a task's config files (spec §3.1 ConfigSpec) into bytes before the container starts.

INLINE data is already decoded; EXECUTOR_LOCAL_FILE reads a host file; EXECUTOR_HTTP_FETCH calls
the given host (not localhost, unlike the reference) and keeps at most 1 MiB (the reference's
``2 ^ 20`` is a Java XOR that truncates to 22 bytes; we do not copy that).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from agent.errors import AgentError
from agent.models import ConfigFile, HttpFetch

MAX_CONFIG_BYTES = 1 << 20


class ConfigFileError(AgentError):
    code = "config_file_failed"


async def materialise(configs: Sequence[ConfigFile]) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    for config in configs:
        files.append((config.local_filename, await _content(config)))
    return files


async def _content(config: ConfigFile) -> bytes:
    if config.kind == "INLINE":
        return config.data or b""
    if config.kind == "EXECUTOR_LOCAL_FILE":
        assert config.file_path_on_host is not None
        return await asyncio.to_thread(_read_local, config.file_path_on_host, config.local_filename)
    if config.kind == "EXECUTOR_HTTP_FETCH":
        assert config.http is not None
        return await _fetch(config.http, config.local_filename)
    raise ConfigFileError(
        f"config {config.local_filename}: {config.kind} should have been resolved to INLINE "
        "by the controller"
    )


def _read_local(path: str, target: str) -> bytes:
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(
            f"config {target}: cannot read host file {path}: {exc.strerror or exc}"
        ) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"config {target}: host file {path} is larger than 1 MiB")
    return data


async def _fetch(http: HttpFetch, target: str) -> bytes:
    headers = dict(http.headers)
    if http.auth_header:
        headers["Authorization"] = http.auth_header
    elif http.username is not None:
        token = f"{http.username}:{http.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.urlsafe_b64encode(token).decode()
    timeout = aiohttp.ClientTimeout(
        total=http.connection_timeout_s + http.operation_timeout_s,
        sock_connect=http.connection_timeout_s,
    )
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                http.verb,
                http.url,
                data=http.payload,
                headers=headers,
                ssl=not http.insecure,
                allow_redirects=False,
            ) as resp,
        ):
            if resp.status not in http.success_codes:
                raise ConfigFileError(
                    f"config {target}: {http.verb} {http.url} answered HTTP {resp.status}"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_CONFIG_BYTES:
                    raise ConfigFileError(f"config {target}: {http.url} returned more than 1 MiB")
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigFileError(
            f"config {target}: {http.verb} {http.url} failed: {exc or type(exc).__name__}"
        ) from exc
    return b"".join(chunks)

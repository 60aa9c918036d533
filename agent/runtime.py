"""DockerRuntime: the only module that imports docker.

docker-py is blocking, so every call goes through ``_call``: one bounded thread pool, a deadline
a little longer than docker-py's own socket timeout, and docker exceptions mapped to the agent's
errors. Pulls use a pool of their own (they can take minutes) and can be cancelled between chunks.
The events stream runs in its own thread and hands events to the loop thread-safely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import functools
import io
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests.exceptions
import structlog
import urllib3.exceptions

from agent.containers import (
    LABEL_JOB_TYPE,
    ContainerEvent,
    ContainerParams,
    ContainerStatus,
    ContainerSummary,
    EventKind,
    PullProgress,
)
from agent.errors import (
    ContainerNotFound,
    ContainerRuntimeError,
    ImageNotFound,
    ImagePullFailed,
    RuntimeUnavailable,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

_UNAVAILABLE = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # a stream cut mid-read (e.g. dockerd restarting mid-pull)
    ConnectionError,
    TimeoutError,
)


def _parse_time_ms(text: str | None) -> int | None:
    if not text or text.startswith("0001-01-01"):
        return None
    # Docker writes RFC 3339 with nanoseconds: 2024-04-28T10:00:00.123456789Z
    main, _, frac = text.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    stamp = dt.datetime.fromisoformat(f"{main}.{frac}+00:00")
    return int(stamp.timestamp() * 1000)


def split_image(image: str) -> tuple[str, str]:
    """``repo[:tag][@digest]`` -> (repo, tag or digest); the tag defaults to latest."""
    if "@" in image:
        repo, digest = image.split("@", 1)
        return repo, digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag
    return image, "latest"


class DockerRuntime:
    def __init__(
        self,
        socket_path: str = "/var/run/docker.sock",
        command_timeout_s: float = 30.0,
        pool_size: int = 8,
        pull_pool_size: int = 4,
        observe: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self._base_url = f"unix://{socket_path}"
        self._timeout = command_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="docker")
        # Pulls and log follows can block for minutes: they run on daemon threads of their own,
        # so a stalled registry or a quiet container never holds up the agent's exit.
        self._pull_slots = asyncio.Semaphore(pull_pool_size)
        self._client_lock = threading.Lock()
        self._client: docker.DockerClient | None = None
        self._events_thread: threading.Thread | None = None
        self._events_stop = threading.Event()
        self._events_stream: Any = None
        self._observe = observe
        self._log_client: docker.DockerClient | None = None
        self._log_streams: dict[int, Any] = {}
        self._closing = False
        self.calls = 0

    # --- plumbing -----------------------------------------------------------------------------

    def _docker(self) -> docker.DockerClient:
        """The shared client, created on first use (API version negotiated with the engine)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> docker.DockerClient:
        try:
            return docker.DockerClient(
                base_url=self._base_url, version="auto", timeout=int(self._timeout)
            )
        except docker.errors.DockerException as exc:
            raise RuntimeUnavailable(
                f"the Docker engine at {self._base_url} does not answer: {exc}"
            ) from exc

    async def _call(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run_in(name, self._pool, self._timeout + 5, fn, *args, **kwargs)

    async def _run_in(
        self,
        name: str,
        pool: ThreadPoolExecutor | None,
        deadline_s: float | None,
        fn: Callable[..., T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._mapped, fn, *args, **kwargs)
        self.calls += 1
        started = time.monotonic()
        ok = False
        future = (
            loop.run_in_executor(pool, call)
            if pool is not None
            else asyncio.wrap_future(_in_daemon_thread(call, name))
        )
        try:
            async with asyncio.timeout(deadline_s):
                result: T = await future
            ok = True
            return result
        except TimeoutError:
            raise RuntimeUnavailable(
                f"the Docker engine did not answer within {deadline_s:.0f} s"
            ) from None
        finally:
            if self._observe is not None:
                self._observe(name, time.monotonic() - started, ok)

    def _mapped(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound as exc:
            raise ContainerNotFound(_explain(exc)) from exc
        except docker.errors.APIError as exc:
            raise ContainerRuntimeError(_explain(exc)) from exc
        except _UNAVAILABLE as exc:
            self._drop_client()
            raise RuntimeUnavailable(f"the Docker engine does not answer: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise RuntimeUnavailable(str(exc)) from exc

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- ContainerRuntime ---------------------------------------------------------------------

    async def version(self) -> str:
        def get() -> str:
            return str(self._docker().version().get("ApiVersion", "?"))

        return await self._call("version", get)

    async def image_present(self, image: str) -> bool:
        def get() -> bool:
            try:
                self._docker().api.inspect_image(image)  # type: ignore[no-untyped-call]
            except docker.errors.ImageNotFound:
                return False
            return True

        return await self._call("inspect_image", get)

    async def image_id(self, image: str) -> str:
        def get() -> str:
            try:
                image_data = self._docker().api.inspect_image(image)  # type: ignore[no-untyped-call]
                return str(image_data["Id"])
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(f"image {image} is not present") from exc

        return await self._call("inspect_image", get)

    async def pull(
        self,
        image: str,
        auth: Mapping[str, str] | None,
        cancel: threading.Event,
        progress: PullProgress | None = None,
    ) -> None:
        """Pull ``image``; returns when done, raises ImagePullFailed with the registry's words.
        The caller enforces the deadline: on timeout it sets ``cancel``, which closes the stream
        at the next chunk (or when docker-py's socket timeout fires)."""
        repo, tag = split_image(image)
        progress = progress if progress is not None else PullProgress()

        def run() -> None:
            stream: Iterator[dict[str, Any]] = self._docker().api.pull(
                repo, tag=tag, stream=True, decode=True, auth_config=dict(auth) if auth else None
            )
            try:
                for chunk in stream:
                    if cancel.is_set():
                        return
                    if "error" in chunk:
                        raise ImagePullFailed(str(chunk.get("error")).strip())
                    _track(progress, chunk)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

        try:
            async with self._pull_slots:
                await self._run_in("pull", None, None, run)
        except ContainerNotFound as exc:  # a 404 from /images/create: no such repository
            raise ImagePullFailed(str(exc)) from exc
        except ContainerRuntimeError as exc:
            if isinstance(exc, ImagePullFailed | RuntimeUnavailable):
                raise
            raise ImagePullFailed(str(exc)) from exc

    async def create(self, params: ContainerParams) -> str:
        def run() -> str:
            client = self._docker()
            host_config = client.api.create_host_config(**_host_config(params))
            created = client.api.create_container(
                image=params.image,
                name=params.name,
                command=list(params.command) if params.command else None,
                environment=list(params.env),
                user=params.user or "",
                labels=dict(params.labels),
                host_config=host_config,
            )
            return str(created["Id"])

        return await self._call("create", run)

    async def put_files(self, container_id: str, files: Sequence[tuple[str, bytes]]) -> None:
        if not files:
            return
        archive = _tar(files)

        def run() -> None:
            if not self._docker().api.put_archive(container_id, "/", archive):
                raise ContainerRuntimeError(f"copying config files into {container_id} failed")

        await self._call("put_archive", run)

    async def start(self, container_id: str) -> None:
        await self._call("start", lambda: self._docker().api.start(container_id))

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        def run() -> None:
            try:
                self._docker().api.kill(container_id, signal=signal)
            except docker.errors.NotFound:
                return  # gone already, which is what a kill wants
            except docker.errors.APIError as exc:
                # 409: not running any more, which is what a kill wants.
                if exc.status_code != 409:
                    raise

        await self._call("kill", run)

    async def inspect(self, container_id: str) -> ContainerStatus | None:
        def run() -> ContainerStatus | None:
            try:
                data = self._docker().api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
            return _status(data)

        return await self._call("inspect", run)

    async def remove(self, container_id: str) -> None:
        def run() -> None:
            try:
                self._docker().api.remove_container(container_id, v=True, force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # removal already in progress
                    raise

        await self._call("remove", run)

    async def remove_image(self, image_id: str) -> None:
        def run() -> None:
            try:
                self._docker().api.remove_image(image_id)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # still used by another container
                    raise

        await self._call("remove_image", run)

    async def list_managed(self) -> list[ContainerSummary]:
        def run() -> list[ContainerSummary]:
            rows = self._docker().api.containers(all=True, filters={"label": LABEL_JOB_TYPE})
            return [
                ContainerSummary(
                    id=str(row["Id"]),
                    name=str((row.get("Names") or ["/"])[0]).lstrip("/"),
                    running=row.get("State") == "running",
                    labels=dict(row.get("Labels") or {}),
                    image_id=str(row.get("ImageID", "")),
                    state=str(row.get("State", "")),
                )
                for row in rows
            ]

        return await self._call("list", run)

    # --- logs ---------------------------------------------------------------------------------

    def follow_logs(
        self,
        container_id: str,
        on_data: Callable[[bytes], None],
        on_end: Callable[[], None],
        since: int | None = None,
    ) -> Callable[[], None]:
        key = id(object())
        stopped = threading.Event()

        def run() -> None:
            try:
                with self._client_lock:
                    if self._log_client is None:
                        self._log_client = docker.DockerClient(
                            base_url=self._base_url,
                            version="auto",
                            timeout=None,  # type: ignore[arg-type]  # a follow waits indefinitely
                            max_pool_size=512,
                        )
                    client = self._log_client
                stream = client.api.logs(
                    container_id, stdout=True, stderr=True, stream=True, follow=True, since=since
                )
                self._log_streams[key] = stream
                if stopped.is_set() or self._closing:  # stop() or close() came first
                    stream.close()
                    return
                for chunk in stream:
                    on_data(chunk)
            except Exception as exc:
                if not stopped.is_set() and not self._closing:
                    log.info(
                        "container_log_stream_ended", container_id=container_id[:12], error=str(exc)
                    )
            finally:
                self._log_streams.pop(key, None)
                on_end()

        def stop() -> None:
            stopped.set()
            stream = self._log_streams.pop(key, None)
            if stream is not None:
                try:
                    stream.close()
                except Exception as exc:
                    log.debug("container_log_close_failed", error=str(exc))

        _in_daemon_thread(functools.partial(contextvars.copy_context().run, run), "logs")
        return stop

    # --- events -------------------------------------------------------------------------------

    def start_events(self, sink: Callable[[ContainerEvent], None]) -> None:
        """Read the engine's event stream in a thread of its own; every event (and a RESYNC after
        each (re)connection) is handed to ``sink`` on the calling loop."""
        loop = asyncio.get_running_loop()

        def hand(event: ContainerEvent) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(sink, event)

        self._events_stop.clear()
        self._events_thread = threading.Thread(
            target=self._pump_events, args=(hand,), name="docker-events", daemon=True
        )
        self._events_thread.start()

    def _pump_events(self, hand: Callable[[ContainerEvent], None]) -> None:
        since: int | None = None
        backoff = 0.2
        while not self._events_stop.is_set():
            client: docker.DockerClient | None = None
            try:
                client = docker.DockerClient(
                    base_url=self._base_url,
                    version="auto",
                    timeout=None,  # type: ignore[arg-type]  # the stream waits indefinitely
                )
                filters = {"type": "container", "label": LABEL_JOB_TYPE}
                stream = client.api.events(since=since, until=None, filters=filters, decode=True)
                self._events_stream = stream
                hand(ContainerEvent(EventKind.RESYNC))
                backoff = 0.2
                for raw in stream:
                    event = _event(raw)
                    if event is None:
                        continue
                    since = max(since or 0, event.time_ns // 1_000_000_000)
                    hand(event)
            except Exception as exc:  # the stream broke: tell the loop, then reconnect
                if self._events_stop.is_set():
                    break
                log.warning("docker_events_disconnected", error=str(exc))
                hand(ContainerEvent(EventKind.UNAVAILABLE))
            finally:
                self._events_stream = None
                if client is not None:
                    client.close()
            if self._events_stop.wait(backoff):
                break
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        self._closing = True
        self._events_stop.set()
        for stream in list(self._log_streams.values()):
            try:
                stream.close()
            except Exception as exc:
                log.debug("container_log_close_failed", error=str(exc))
        stream = self._events_stream
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:
                log.debug("docker_events_close_failed", error=str(exc))
        thread = self._events_thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 5)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        self._drop_client()
        if self._log_client is not None:
            self._log_client.close()
            self._log_client = None


def _in_daemon_thread(fn: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``fn`` on a daemon thread of its own; the interpreter does not wait for it at exit."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def _explain(exc: docker.errors.APIError) -> str:
    explanation = getattr(exc, "explanation", None)
    if explanation:
        return str(explanation.decode() if isinstance(explanation, bytes) else explanation)
    return str(exc)


def _event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    action = str(raw.get("Action") or raw.get("status") or "")
    try:
        kind = EventKind(action)
    except ValueError:
        return None
    actor = raw.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    exit_code = attrs.get("exitCode")
    return ContainerEvent(
        kind=kind,
        container_id=str(actor.get("ID") or raw.get("id") or ""),
        instance_id=str(attrs.get("drove.instance.id", "")),
        exit_code=int(exit_code) if exit_code is not None else None,
        time_ns=int(raw.get("timeNano") or time.time_ns()),
    )


def _status(data: Mapping[str, Any]) -> ContainerStatus:
    state = data.get("State") or {}
    host = data.get("HostConfig") or {}
    config = data.get("Config") or {}
    return ContainerStatus(
        id=str(data.get("Id", "")),
        name=str(data.get("Name", "")).lstrip("/"),
        running=bool(state.get("Running")) or bool(state.get("Restarting")),
        exit_code=int(state.get("ExitCode", -1)),
        oom_killed=bool(state.get("OOMKilled")),
        finished_at_ms=_parse_time_ms(state.get("FinishedAt")),
        labels=dict(config.get("Labels") or {}),
        image_id=str(data.get("Image", "")),
        cpuset_cpus=str(host.get("CpusetCpus") or ""),
        cpuset_mems=str(host.get("CpusetMems") or ""),
        memory_bytes=int(host.get("Memory") or 0),
        pid=int(state.get("Pid") or 0),
    )


def _host_config(params: ContainerParams) -> dict[str, Any]:
    config: dict[str, Any] = {
        "mem_limit": params.mem_limit_bytes,
        "memswap_limit": params.mem_limit_bytes,
        "ulimits": [docker.types.Ulimit(name="nofile", soft=params.nofile, hard=params.nofile)],
        "log_config": docker.types.LogConfig(
            type=params.log_driver, config=dict(params.log_options)
        ),
    }
    if params.cpuset_cpus:
        config["cpuset_cpus"] = params.cpuset_cpus
    if params.cpuset_mems:
        config["cpuset_mems"] = params.cpuset_mems
    if params.volumes:
        config["binds"] = {
            v.path_on_host: {"bind": v.path_in_container, "mode": "ro" if v.read_only else "rw"}
            for v in params.volumes
        }
    if params.devices:
        config["devices"] = list(params.devices)
    if params.device_requests:
        config["device_requests"] = [
            docker.types.DeviceRequest(
                driver=r.driver,
                count=r.count,
                device_ids=list(r.device_ids),
                capabilities=[list(c) for c in r.capabilities],
                options=dict(r.options),
            )
            for r in params.device_requests
        ]
    return config


def _tar(files: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar to extract at ``/``: member names are the paths without the leading slash, so missing
    parent directories are created."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, content in files:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(content)
            info.mode = 0o644
            info.mtime = int(now)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _track(progress: PullProgress, chunk: Mapping[str, Any]) -> None:
    layer = chunk.get("id")
    detail = chunk.get("progressDetail") or {}
    status = str(chunk.get("status", ""))
    progress.status = status
    if not layer:
        return
    total = detail.get("total")
    if status == "Downloading" and total:
        progress.layers_total[layer] = int(total)
        progress.layers_done[layer] = int(detail.get("current") or 0)
    elif status in ("Download complete", "Pull complete") and layer in progress.layers_total:
        progress.layers_done[layer] = progress.layers_total[layer]


def engine_info(socket_path: str, timeout_s: float = 5.0) -> dict[str, str]:
    """For ``drove-agent doctor``: what the engine says about itself (blocking)."""
    try:
        client = docker.DockerClient(
            base_url=f"unix://{socket_path}", version="auto", timeout=int(timeout_s)
        )
    except docker.errors.DockerException as exc:
        raise RuntimeUnavailable(str(exc)) from exc
    try:
        version = client.version()
        info = client.info()
    except (docker.errors.DockerException, *_UNAVAILABLE) as exc:
        raise RuntimeUnavailable(str(exc)) from exc
    finally:
        client.close()
    return {
        "version": str(version.get("Version", "?")),
        "api": str(version.get("ApiVersion", "?")),
        "cgroup_version": str(info.get("CgroupVersion", "?")),
        "cgroup_driver": str(info.get("CgroupDriver", "?")),
    }

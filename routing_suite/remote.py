"""The client side of NDIF runs: every request with a deadline, bounded retries
of transient failures, and a count of requests and bytes.

`RetryingRemote` is an nnsight backend (what `remote=True` builds) that
re-sends the same serialized trace when the connection is refused or drops,
the server answers 5xx, or no result comes within the deadline; a job the
server ran and failed (an error in the trace, a model it cannot load) is not
retried. After the last attempt it raises `RemoteFailure`, whose message says
what failed and that a rerun resumes from the last finished batch.

`RequestStats` counts requests and bytes for whichever backend ran them, so
cells can be compared with and without grouping.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch
from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.response import Status

from routing_suite.errors import ConfigError, RunFailure

log = logging.getLogger(__name__)


class RemoteFailure(RunFailure):
    """A remote call failed for good (after retries, or at once if not transient)."""


class RemoteTimeout(TimeoutError):
    """No result within the backend's deadline."""


@dataclass
class RequestStats:
    """Requests sent and bytes moved, for the report of a cell."""

    requests: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    retries: int = 0
    by_stage: dict[str, dict[str, int]] = field(default_factory=dict)
    stage: str = "run"

    def add(self, down: int, up: int = 0) -> None:
        self.requests += 1
        self.bytes_down += down
        self.bytes_up += up
        row = self.by_stage.setdefault(self.stage, {"requests": 0, "bytes_down": 0, "bytes_up": 0})
        row["requests"] += 1
        row["bytes_down"] += down
        row["bytes_up"] += up

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
            "retries": self.retries, "by_stage": {k: dict(v) for k, v in self.by_stage.items()},
        }


def result_bytes(saved: Any, compress: bool = True) -> int:
    """Size of a result as a server sends it back: torch.save, zstd-compressed."""
    buffer = io.BytesIO()
    torch.save(saved, buffer, pickle_protocol=4)
    data = buffer.getvalue()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=6).compress(data)
    return len(data)


def is_transient(err: BaseException) -> bool:
    """Connection refused or dropped, a 5xx answer, a timeout: worth sending again."""
    import httpx
    import websocket

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (RemoteTimeout, ConnectionError, socket.timeout, httpx.TransportError)):
            return True
        if isinstance(err, websocket.WebSocketConnectionClosedException | websocket.WebSocketTimeoutException):
            return True
        if isinstance(err, websocket.WebSocketBadStatusException):
            return getattr(err, "status_code", 0) >= 500
        if isinstance(err, httpx.HTTPStatusError):
            return err.response.status_code >= 500
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            return True
        err = err.__cause__ or err.__context__
    return False


class RetryingRemote(RemoteBackend):
    """nnsight's blocking remote backend with a deadline, retries and a byte count."""

    def __init__(
        self, nn_model, host: str, api_key: str, timeout_s: float, max_retries: int, backoff_s: float, stats: RequestStats
    ) -> None:
        super().__init__(nn_model.to_model_key(), host=host, api_key=api_key, env=nn_model._remoteable_get_env())
        self.display = StatusDisplay(enabled=False)  # the library logs; nnsight's spinner would print
        self.timeout_s, self.max_retries, self.backoff_s, self.stats = timeout_s, max_retries, backoff_s, stats
        self._down = self._up = 0

    def __call__(self, tracer=None):
        for attempt in range(self.max_retries + 1):
            self._down = self._up = 0
            try:
                result = super().__call__(tracer)
            except Exception as err:  # noqa: BLE001 - classified below, re-raised as RemoteFailure
                if not is_transient(err):
                    raise RemoteFailure(f"NDIF at {self.host} refused the request: {_describe(err)}") from err
                if attempt == self.max_retries:
                    raise RemoteFailure(
                        f"NDIF at {self.host} failed {attempt + 1} times in a row ({_describe(err)}); "
                        "stopping. The store keeps every finished batch: rerun the same command to resume."
                    ) from err
                wait = self.backoff_s * 2**attempt
                self.stats.retries += 1
                reason = _describe(err).replace(self.host, "<host>")  # logs name neither key nor host
                log.warning("NDIF request failed (%s); retry %d/%d in %.1f s", reason, attempt + 1, self.max_retries, wait)
                time.sleep(wait)
                continue
            self.stats.add(self._down, self._up)
            return result
        raise AssertionError("unreachable")

    def _serialize(self, tracer) -> bytes:
        blob = super()._serialize(tracer)
        self._up = len(blob)
        return blob

    def finalize(self, content: bytes):
        self._down = len(content)
        return super().finalize(content)

    def request(self, request, tracer):
        """nnsight's blocking request, with a deadline on the whole job."""
        import websocket

        blob = self._serialize(tracer)
        deadline = time.monotonic() + self.timeout_s
        header = {"ndif-api-key": self.api_key} if self.api_key else None
        connection = websocket.create_connection(f"{self.ws_host}/subscribe", header=header, timeout=min(self.timeout_s, 30.0))
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, blob)
            connection.settimeout(1.0)
            while True:
                if time.monotonic() > deadline:
                    raise RemoteTimeout(f"no result within backend.timeout_s={self.timeout_s:g} s")
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                response = self.parse(message)
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        finally:
            connection.close()


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------- checks before any work


def check_service(host: str, timeout_s: float = 10.0) -> None:
    """ConfigError unless an NDIF service answers at `host`."""
    import httpx

    name = urlparse(host).hostname or ""
    try:
        socket.getaddrinfo(name, None)
    except OSError as err:
        raise ConfigError(f"backend.host={host!r}: unknown host {name!r} ({err.strerror or err})") from err
    try:
        response = httpx.get(f"{host.rstrip('/')}/ping", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ConfigError(f"backend.host={host!r}: no NDIF service answers ({_describe(err)})") from err
    if response.status_code != 200:
        raise ConfigError(f"backend.host={host!r}: /ping answered HTTP {response.status_code}, not an NDIF service")


def hosted_models(host: str, timeout_s: float = 60.0) -> set[str] | None:
    """Repo ids the service runs now, or None when it does not say (then nothing is refused)."""
    import httpx

    try:
        response = httpx.get(f"{host.rstrip('/')}/status", timeout=timeout_s)
        response.raise_for_status()
        status = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    deployments = status.get("deployments") if isinstance(status, dict) else None
    if not isinstance(deployments, dict):
        return None
    found = set()
    for key, info in deployments.items():
        found.add(str(info.get("repo_id", key)) if isinstance(info, dict) else str(key))
    return found


def model_repo(nn_model) -> str:
    """The repo id (or local path) a remote request names."""
    key = nn_model.to_model_key().split(":", 1)[1]
    return json.loads(key)["repo_id"]


__all__ = ["RemoteError", "RemoteFailure", "RequestStats", "RetryingRemote", "check_service", "hosted_models", "result_bytes"]

"""The client side of NDIF runs: every request with one deadline, bounded
retries of transient failures, results decoded without running code, and a
count of requests and bytes.

`RetryingRemote` is an nnsight backend (what `remote=True` builds). One
attempt of a request (subscribe, submit, wait, download) must end within
`backend.timeout_s`: every blocking step is given only the time that is left.
It sends the same trace again when the connection is refused or drops, the
server answers 5xx, or the deadline passes; a job the server ran and failed
(an error in the trace, a model it cannot load) is not retried. After the last
attempt it raises `RemoteFailure`, whose message says what failed and that a
rerun resumes from the last finished batch. So a request ends within
`timeout_s x (max_retries + 1)` plus the waits between attempts.

Results are decoded with `routing_suite.safe_results.safe_load` (nnsight's own
loader would unpickle whatever a server sent); anything but tensors and plain
data is refused, not retried.

`RequestStats` counts requests and bytes for whichever backend ran them, so
cells can be compared with and without grouping.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any
from urllib.parse import urlparse

import torch
from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.response import ResponseModel, Status

from routing_suite.errors import ConfigError, RunFailure
from routing_suite.safe_results import UnsafeResult, safe_load

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
    """nnsight's blocking remote backend with one deadline per attempt, retries, safe
    decoding and a byte count (see the module doc)."""

    def __init__(
        self, nn_model, host: str, api_key: str, timeout_s: float, max_retries: int, backoff_s: float, stats: RequestStats
    ) -> None:
        super().__init__(nn_model.to_model_key(), host=host, api_key=api_key, env=nn_model._remoteable_get_env())
        self.display = StatusDisplay(enabled=False)  # the library logs; nnsight's spinner would print
        self.timeout_s, self.max_retries, self.backoff_s, self.stats = timeout_s, max_retries, backoff_s, stats
        self._down = self._up = 0
        self._deadline = 0.0

    def __call__(self, tracer=None):
        for attempt in range(self.max_retries + 1):
            self._down = self._up = 0
            self._deadline = time.monotonic() + self.timeout_s
            try:
                result = super().__call__(tracer)
            except UnsafeResult as err:
                raise RemoteFailure(
                    f"NDIF at {self.host} sent a result that could run code when loaded ({err}); refused, not retried"
                ) from err
            except Exception as err:  # noqa: BLE001 - classified below, re-raised as RemoteFailure
                if not is_transient(err):
                    raise RemoteFailure(
                        f"NDIF at {self.host} failed the request ({_describe(err)}); not retried. "
                        "The store keeps every finished batch: rerun the same command to resume."
                    ) from err
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

    def _left(self) -> float:
        """Seconds left of this attempt's deadline; RemoteTimeout once it has passed."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RemoteTimeout(f"no result within backend.timeout_s={self.timeout_s:g} s")
        return left

    def _serialize(self, tracer) -> bytes:
        blob = super()._serialize(tracer)
        self._up = len(blob)
        return blob

    def request(self, request, tracer):
        """Subscribe, submit, wait and download, each step given only what is left of the deadline."""
        import websocket

        blob = self._serialize(tracer)
        header = {"ndif-api-key": self.api_key} if self.api_key else None
        connection = websocket.create_connection(f"{self.ws_host}/subscribe", header=header, timeout=self._left())
        try:
            connection.settimeout(self._left())
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, blob)
            while True:
                connection.settimeout(min(1.0, self._left()))
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                response = self.parse(message)
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        finally:
            # A polite close waits for the server's reply: only within the deadline.
            left = self._deadline - time.monotonic()
            if left > 0.05:
                connection.close(timeout=min(1.0, left))
            else:
                connection.shutdown()

    def _post(self, request, blob: bytes) -> ResponseModel:
        """Submit the request (the envelope as a form field, the trace as a file), within the deadline."""
        import httpx

        headers = {"ndif-timestamp": repr(time.time()), "nnsight-version": version("nnsight"), "python-version": sys.version}
        if self.api_key:
            headers["ndif-api-key"] = self.api_key
        try:
            with httpx.Client(timeout=httpx.Timeout(self._left())) as client:
                answer = client.post(
                    f"{self.host}/request", data={"data": request.metadata()},
                    files={"blob": ("request", blob, "application/octet-stream")}, headers=headers,
                )
            answer.raise_for_status()
        except httpx.HTTPStatusError as err:
            raise RemoteError(f"the request was refused: {_detail(err.response)}") from err
        return ResponseModel.model_validate_json(answer.text)

    def download_result(self, url):
        """The result as it came on the response, or downloaded within the deadline."""
        if isinstance(url, (bytes, bytearray)):
            return self.finalize(bytes(url))
        if not url:
            return None
        import httpx

        buffer = io.BytesIO()
        with httpx.Client(timeout=httpx.Timeout(self._left())) as client, client.stream("GET", url) as answer:
            answer.raise_for_status()
            for chunk in answer.iter_bytes(chunk_size=1 << 17):
                buffer.write(chunk)
                self._left()  # a server that trickles bytes stops at the deadline too
        return self.finalize(buffer.getvalue())

    def finalize(self, content: bytes):
        self._down = len(content)
        if self.compress:
            import zstandard

            content = zstandard.ZstdDecompressor().decompress(content)
        return safe_load(content)

    @staticmethod
    def parse(message):
        """A status update: JSON text, or a binary frame (a pickled response) decoded safely."""
        if isinstance(message, (bytes, bytearray)):
            return ResponseModel(**safe_load(bytes(message)))
        return ResponseModel.model_validate_json(message)


def _detail(response) -> str:
    """What a refusing server said (FastAPI's {"detail": ...}), else its status line."""
    try:
        body = response.json()
        said = body.get("detail") if isinstance(body, dict) else body
    except ValueError:
        said = response.text
    return f"HTTP {response.status_code}" + (f": {str(said).strip().splitlines()[0]}" if said else "")


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

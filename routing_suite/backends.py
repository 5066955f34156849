"""Where traces run. One code path: a backend only decides nnsight's `remote=`
argument (through `trace_kwargs`), how the model pair is placed, and how many
prompts go into one request. Every trace asks it for its keyword arguments
and reports what came back (`record`), so requests and bytes are counted the
same way for every backend.

The NDIF key is read from NDIF_API_KEY when a run starts and is never kept
in a config, a store or a log.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import urlparse

import torch

from routing_suite.errors import ConfigError
from routing_suite.models import ModelPair, Placement
from routing_suite.remote import RequestStats, RetryingRemote, check_service, hosted_models, model_repo, result_bytes

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What every `backend` config instantiates (LocalBackend, NdifBackend): the one
    interface the stages use to run traces, whatever runs them."""

    name: str  # "local" | "ndif": stores record it
    device: str  # where the models run
    batch_size: int  # prompts per trace (per request remotely)
    max_invokes: int | None  # at most this many invokes per trace; None: no limit
    stats: RequestStats  # requests and bytes, counted by `record`

    @property
    def placement(self) -> Placement:
        """How the model pair is placed (local weights or the base on the server; the
        fine-tune merged or as adapter updates)."""

    @property
    def threaded_writes(self) -> bool:
        """Whether stores may be written from a background thread during traces."""

    def preflight(self) -> None:
        """Checks made before any model is loaded (a device that exists, a service that answers)."""

    def check_pair(self, pair: ModelPair) -> None:
        """Checks of the loaded pair against where it runs (the service hosts its base)."""

    def trace_kwargs(self, nn_model=None) -> dict[str, Any]:
        """nnsight's keyword arguments for a trace of `nn_model` (`remote=` and its backend)."""

    def record(self, nn_model, saved: Any) -> None:
        """One trace ran and returned `saved`: count it."""


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


@dataclass
class LocalBackend:
    """Traces run in this process, on `device`."""

    device: str = "cpu"
    batch_size: int = 32
    max_invokes: int | None = None
    stats: RequestStats = field(default_factory=RequestStats, repr=False)

    def __post_init__(self) -> None:
        _check_batching(self.batch_size, self.max_invokes)

    @property
    def name(self) -> str:
        return "local"

    @property
    def placement(self) -> Placement:
        return Placement()

    @property
    def threaded_writes(self) -> bool:
        return True

    def preflight(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"backend.device={self.device!r} but no CUDA device is available (use 'cpu')")

    def check_pair(self, pair: ModelPair) -> None:
        return None

    def trace_kwargs(self, nn_model=None) -> dict[str, Any]:
        return {}

    def record(self, nn_model, saved: Any) -> None:
        """One trace ran; count it and the bytes of what it returned (raw tensors)."""
        self.stats.add(_tensor_bytes(saved))


@dataclass
class NdifBackend:
    """Traces run on an NDIF server (`remote=True`), or, with `simulate`, through
    nnsight's in-process serialization (`remote="local"`) against local weights.

    The fine-tune runs as the base plus its adapter's low-rank updates, so the
    server needs only the base, and both models of a batch share one request."""

    host: str | None = None
    batch_size: int = 32
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 2.0
    simulate: bool = False
    # The server places the models; a simulated run keeps the local weights on the CPU.
    device: ClassVar[str] = "cpu"
    # Plain http:// to a host other than this machine sends NDIF_API_KEY (and the
    # traces) unencrypted: refused unless this is set (results are decoded safely
    # either way, see routing_suite.remote).
    allow_http: bool = False
    # At most this many invokes (models x conditions x patch sets) per request;
    # None: as many as a batch has (fewest requests). 1: no grouping at all.
    max_invokes: int | None = None
    stats: RequestStats = field(default_factory=RequestStats, repr=False)

    def __post_init__(self) -> None:
        _check_batching(self.batch_size, self.max_invokes)
        if self.host is not None and urlparse(self.host).scheme not in ("http", "https"):
            raise ConfigError(f"backend.host={self.host!r} must be an http(s) URL")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError("backend.timeout_s must be > 0, backend.max_retries and backend.backoff_s >= 0")

    @property
    def name(self) -> str:
        return "ndif"

    @property
    def placement(self) -> Placement:
        return Placement(finetune="deltas", weights="local" if self.simulate else "remote")

    @property
    def threaded_writes(self) -> bool:
        """nnsight's simulation (remote="local") takes every module a server would
        not have out of sys.modules while it reads a request; a store write in
        another thread then re-imports zarr's buffer classes and fails."""
        return not self.simulate

    @property
    def resolved_host(self) -> str:
        from nnsight import CONFIG

        host = self.host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST
        key = "backend.host" if self.host else "NDIF_HOST"
        if urlparse(host).scheme not in ("http", "https"):
            raise ConfigError(f"{key}={host!r} must be an http(s) URL")
        if urlparse(host).scheme == "http" and not _is_loopback(host) and not self.allow_http:
            raise ConfigError(
                f"{key}={host!r}: plain http would send NDIF_API_KEY and the traces unencrypted; "
                "use https, or backend.allow_http=true on a network you trust"
            )
        return host.rstrip("/")

    def preflight(self) -> None:
        """Fail before any work if the run cannot reach the service."""
        register_suite()
        if self.simulate:
            return
        if not os.environ.get("NDIF_API_KEY"):
            raise ConfigError("backend=ndif needs the NDIF_API_KEY environment variable (it is never read from a config)")
        # httpx logs every request, with the host's address, at INFO: kept out of the
        # job's log from the first request on (the per-stage counts say it better).
        logging.getLogger("httpx").setLevel(logging.WARNING)
        check_service(self.resolved_host, min(self.timeout_s, 10.0))

    def check_pair(self, pair: ModelPair) -> None:
        """Refuse, before any trace, a model the service does not run."""
        if self.simulate:
            return
        host = self.resolved_host
        for which in ("base", "finetuned"):
            repo = model_repo(pair.traced(which).nn)
            if os.path.isabs(repo):
                if not _is_loopback(host):
                    raise ConfigError(
                        f"the {which} model is the local checkpoint {repo!r}: the NDIF service at {host} cannot load it "
                        "(only a server on this machine can; see README 'Remote')"
                    )
                continue
            hosted = hosted_models(host, self.timeout_s)
            if hosted is not None and repo not in hosted:
                shown = ", ".join(sorted(hosted)[:8]) or "none"
                raise ConfigError(f"the NDIF service at {host} does not run {repo!r} (it runs: {shown})")

    def trace_kwargs(self, nn_model=None) -> dict[str, Any]:
        if self.simulate:
            return {"remote": "local"}
        if nn_model is None:
            return {"remote": True}
        backend = RetryingRemote(
            nn_model, self.resolved_host, os.environ.get("NDIF_API_KEY", ""), self.timeout_s, self.max_retries,
            self.backoff_s, self.stats,
        )
        return {"backend": backend}

    def record(self, nn_model, saved: Any) -> None:
        """Simulated requests are counted here, with the bytes a server would send
        back; real ones are counted by `RetryingRemote` as they arrive."""
        if self.simulate:
            self.stats.add(result_bytes(saved))


def _check_batching(batch_size: int, max_invokes: int | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"backend.batch_size={batch_size} must be >= 1")
    if max_invokes is not None and max_invokes < 1:
        raise ConfigError(f"backend.max_invokes={max_invokes} must be >= 1 (or null: no limit)")


def _is_loopback(host: str) -> bool:
    name = urlparse(host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def register_suite() -> None:
    """Ship routing_suite's trace helpers by value: a server does not have it
    installed (nnsight does this by itself only for a package that is not)."""
    import nnsight

    nnsight.register("routing_suite")

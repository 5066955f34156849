"""Where traces run. One code path: a backend only decides nnsight's `remote=`
argument and how many prompts go into one request.

The NDIF key is read from NDIF_API_KEY when a run starts and is never kept
in a config, a store or a log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from routing_suite.errors import ConfigError


@dataclass
class LocalBackend:
    """Traces run in this process, on `device`."""

    device: str = "cpu"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"backend.batch_size={self.batch_size} must be >= 1")

    @property
    def name(self) -> str:
        return "local"

    def preflight(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"backend.device={self.device!r} but no CUDA device is available (use 'cpu')")

    def trace_kwargs(self) -> dict[str, Any]:
        return {}


@dataclass
class NdifBackend:
    """Traces run on an NDIF server (`remote=True`)."""

    host: str | None = None
    batch_size: int = 32
    timeout_s: float = 600.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"backend.batch_size={self.batch_size} must be >= 1")
        if self.host is not None and urlparse(self.host).scheme not in ("http", "https"):
            raise ConfigError(f"backend.host={self.host!r} must be an http(s) URL")

    @property
    def name(self) -> str:
        return "ndif"

    @property
    def resolved_host(self) -> str:
        from nnsight import CONFIG

        return self.host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST

    def preflight(self) -> None:
        """Fail before any work if the run cannot reach the service."""
        if not os.environ.get("NDIF_API_KEY"):
            raise ConfigError("backend=ndif needs the NDIF_API_KEY environment variable (it is never read from a config)")

    def trace_kwargs(self) -> dict[str, Any]:
        return {"remote": True}

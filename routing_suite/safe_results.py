"""Remote results decoded without running code.

nnsight loads a result with `torch.load(weights_only=False)`, so a hostile
server (or anyone on a plain http:// path) could run code here. `safe_load`
unpickles only tensors, their storages and dtypes, plain containers and
nnsight's status enum, at any pickle protocol (torch's own `weights_only=True`
refuses the protocol-4 frames nnsight sends); anything else is refused with
`UnsafeResult`.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import torch


class UnsafeResult(pickle.UnpicklingError):
    """A result holding something other than tensors and plain data: loading it could run code."""


# What a result may name: tensors are rebuilt by these (their storages torch.load
# resolves itself), a few plain containers, and the status of a job.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes (as torch's own weights_only loader allows)
    ("nnsight.schema.response", "Status"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeResult(f"it names {module}.{name}")


# torch.load takes a pickle module: this one's unpickler refuses every other global.
_SAFE_PICKLE = types.ModuleType("routing_suite_safe_pickle")
_SAFE_PICKLE.Unpickler = _SafeUnpickler
_SAFE_PICKLE.load = lambda file, **kwargs: _SafeUnpickler(file, **kwargs).load()


def safe_load(content: bytes) -> Any:
    """`torch.load` of a result that unpickles only tensors and plain data (UnsafeResult otherwise)."""
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False, pickle_module=_SAFE_PICKLE)

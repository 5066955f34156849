"""How a streamed group lies on disk: its arrays chunked along one dimension
(prompts, ADL parts or reduction batches), laid out in one trip to zarr's event
loop, its per-entry completion record, and the refusal of non-finite values.
`routing_suite.store.RunStore` writes and reads through these."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import zarr

# A streamed group's completion record, one flag per entry of its streamed dimension
# (prompt, part or batch row); stores made before it kept one flag per batch.
DONE = "done"
LEGACY_DONE = "batch_done"
STREAMED_DIMS = ("prompt", "part", "batch")


def chunk_length_along(dim: str, n: int, along: str, prompts_per_chunk: int) -> int:
    """Prompts are chunked `prompts_per_chunk` at a time; any other streamed dimension
    (ADL partial sums, per-batch reductions) one entry per chunk, written once each."""
    if dim != along:
        return n
    return min(prompts_per_chunk, n) if along == "prompt" else 1


class NonFiniteActivation(RuntimeError):
    """A NaN or Inf about to be stored; the message says where it came from."""


async def gather(coroutines: list) -> None:
    await asyncio.gather(*coroutines)


def done_array(along: str, n: int) -> dict:
    # One chunk: marking a region rewrites one small file, not one per entry.
    return {"shape": (n,), "chunks": (n,), "dtype": "bool", "fill_value": False, "compressors": [],
            "dimension_names": (along,), "attributes": {"meaning": f"true once every value of that {along} is written"}}


async def lay_out(path: str, group: str, coords: dict[str, Any], arrays: dict[str, dict], done: dict) -> None:
    """A streamed group as xarray would lay out `xr.Dataset(coords=coords)`
    plus `arrays` (name -> create_array keywords), in one trip to zarr's event
    loop: dozens of small files at once instead of one after another (a test
    checks it reads back as xarray's own). An existing group, a layout torn by
    a crash before the completion record was made, is replaced."""
    root = await zarr.api.asynchronous.open_group(path, mode="r+")
    g = await root.create_group(group, overwrite=True)
    values: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name, value in coords.items():
        dims, data = ((name,), value) if not isinstance(value, tuple) else ((value[0],), value[1])
        values[name] = (dims, np.asarray(data))
    other = " ".join(sorted(name for name, (dims, _) in values.items() if dims != (name,)))
    if other:  # how xarray tells non-index coordinates from data variables
        await g.update_attributes({"coordinates": other})

    async def coordinate(name: str, dims: tuple[str, ...], data: np.ndarray) -> None:
        dtype = str if data.dtype == object else data.dtype
        array = await g.create_array(name, shape=data.shape, chunks=data.shape, dtype=dtype, dimension_names=dims)
        await array.setitem(slice(None), data)

    await asyncio.gather(
        *(coordinate(name, dims, data) for name, (dims, data) in values.items()),
        *(g.create_array(name, **kwargs) for name, kwargs in arrays.items()),
    )
    await g.create_array(DONE, **done)  # created last: its presence says the layout is whole


def check_finite(name: str, values: np.ndarray, dims: tuple[str, ...], labels: dict[str, list]) -> None:
    """Refuse NaN or Inf, naming where the first one is (model, framing, prompt, layer, ...)."""
    finite = np.isfinite(values)
    if finite.all():
        return
    where = np.argwhere(~finite)[0]
    place = {dim: labels[dim][i] if dim in labels else int(i) for dim, i in zip(dims, where)}
    location = ", ".join(f"{k}={v}" for k, v in place.items() if k not in ("hidden", "head_dim"))
    raise NonFiniteActivation(f"{name}: {int((~finite).sum())} non-finite value(s), first at {location}")

"""One zarr v3 store per run, written through xarray (layout: `routing_suite.store_format`).

The store is created under `<name>.zarr.partial`, filled prompt by prompt
and stage by stage, and renamed to `<name>.zarr` when the run completes. A
rerun of the same config resumes a partial store (finished prompts and
stages are skipped, whatever batch size wrote them; a partial store already
marked complete, a finish cut short, is finished); a complete store is
reused as is, and replaced only with `store.overwrite=true`. A store made by
a different config is refused with the keys that differ, and one another
live process holds (`StoreLock`) with that process's id.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync as zarr_sync

from routing_suite import store_format
from routing_suite.errors import ConfigError
from routing_suite.provenance import differing_keys, digest
from routing_suite.store_layout import (
    DONE,
    LEGACY_DONE,
    STREAMED_DIMS,
    check_finite,
    chunk_length_along,
    done_array,
    gather,
    lay_out,
)
from routing_suite.store_lock import StoreLock
from routing_suite.store_settings import STORED_DTYPES, StoreSettings, check_writable

log = logging.getLogger(__name__)

def text(values) -> np.ndarray:
    """Strings as an object array: zarr v3 stores them as variable-length UTF-8,
    which its spec covers (fixed-width numpy strings it warns about)."""
    return np.array([str(v) for v in values], dtype=object)


class StoreMismatch(ConfigError):
    """The store at this path was written by a different config."""


class StoreCorrupt(ConfigError):
    """Part of a store cannot be read; the message says which and what to do."""


def _partial(final: Path) -> Path:
    return final.with_name(final.name.removesuffix(store_format.STORE_SUFFIX) + store_format.PARTIAL_SUFFIX)


def _complete_with(final: Path, wanted: str) -> bool:
    """`final` is a finished store made by the config whose digest is `wanted`."""
    if not (final / "zarr.json").exists():
        return False
    attrs = dict(zarr.open_group(str(final), mode="r").attrs)
    return bool(attrs.get("complete")) and attrs.get("config_digest") == wanted


class RunStore:
    """A run's store. Use `RunStore.open`, never the constructor."""

    def __init__(self, path: Path, final: Path, settings: StoreSettings, lock: StoreLock | None = None) -> None:
        self.path = path
        self.final = final
        self.settings = settings
        self.lock = lock

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, final: Path, settings: StoreSettings, digest_config: dict, provenance: dict) -> RunStore:
        """Create, resume or reuse the store for this config (see module doc), holding its lock."""
        final = Path(final)
        partial = _partial(final)
        check_writable(final.parent, "store.root")
        wanted = digest(digest_config)
        if not settings.overwrite and not partial.exists() and _complete_with(final, wanted):
            # A finished store is never written to again (every stage is done), so reusing
            # it takes no lock: runs that share one read it side by side (two EM transfers
            # with a family in common refused each other before). Anything else, a partial
            # beside it included, goes through the lock below.
            log.info("reusing complete store %s", final)
            return cls(final, final, settings)
        lock = StoreLock.acquire(final)
        if final.exists() and partial.exists() and not settings.overwrite:
            # Only a store's own finish makes its final name, after its last write: the partial is a leftover.
            log.warning("store %s is complete; removing the leftover %s", final, partial.name)
            shutil.rmtree(partial)
        for existing in (final, partial):
            if not existing.exists():
                continue
            if existing == partial and not (partial / "zarr.json").exists():
                # Stopped before the root metadata's one write: nothing in it can be trusted or used.
                log.warning("store %s was stopped before its first write; starting it anew", partial)
                shutil.rmtree(partial)
                continue
            attrs = dict(zarr.open_group(str(existing), mode="r").attrs)
            if settings.overwrite:
                log.info("store.overwrite=true: removing %s", existing)
                shutil.rmtree(existing)
                continue
            if attrs.get("config_digest") != wanted:
                keys = differing_keys(attrs.get("digest_config", {}), digest_config)
                raise StoreMismatch(
                    f"store {str(existing)!r} was written by a different config (differing keys: {', '.join(keys) or 'schema'}); "
                    "use another store.root or store.overwrite=true"
                )
            store = cls(existing, final, settings, lock)
            if existing == partial and attrs.get("complete"):
                log.info("store %s: completing the finish a stop interrupted", existing)
                store.finish()
            log.info("%s store %s", "reusing complete" if store.path == final else "resuming", store.path)
            return store
        # The root metadata in one write: zarr's `attrs.update` rewrites the file once per
        # key, and a kill between two of those writes left a store without its cell or provenance.
        attributes = {"schema_version": store_format.SCHEMA_VERSION, "config_digest": wanted, "digest_config": digest_config,
                      "stages_done": [], "complete": False, **provenance}
        zarr.create_group(str(partial), zarr_format=3, overwrite=True, attributes=attributes)
        return cls(partial, final, settings, lock)

    # ------------------------------------------------------------ state

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def update_attrs(self, **values: Any) -> None:
        # One write for all of them (see `open`).
        zarr.open_group(str(self.path), mode="r+").update_attributes(values)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def stage_done(self, stage: str) -> bool:
        return stage in self.attrs.get("stages_done", [])

    def mark_stage_done(self, stage: str) -> None:
        done = list(self.attrs.get("stages_done", []))
        if stage not in done:
            self.update_attrs(stages_done=[*done, stage])

    def undo_stages(self, stages: tuple[str, ...]) -> None:
        """Mark `stages` not done (their inputs were found incomplete): they run again."""
        self.update_attrs(stages_done=[s for s in self.attrs.get("stages_done", []) if s not in stages])

    def finish(self) -> Path:
        """Mark the run complete and give the store its final name, then let go of
        its lock. Every step may be repeated: a stop anywhere in here leaves a
        partial store marked complete (or not yet), whose next `open` finishes it."""
        if self.path != self.final:
            _remove_interrupted_writes(self.path)
            if not self.complete:
                self.update_attrs(complete=True, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            # Consolidated metadata makes a finished store open fast and quietly with
            # a plain `xr.open_zarr(path, group=...)`. zarr warns that it is an
            # extension of the v3 format; zarr-python and xarray read it.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                zarr.consolidate_metadata(str(self.path))
            self.path.rename(self.final)
            self.path = self.final
        if self.lock is not None:
            self.lock.release()
        return self.path

    # ------------------------------------------------------------ streamed activations

    def has_streamed(self, group: str) -> bool:
        """Whether the group is laid out: its completion record, created last, exists."""
        root = zarr.open_group(str(self.path), mode="r")
        return group in root and (DONE in root[group] or LEGACY_DONE in root[group])

    def create_streamed(
        self, group: str, coords: dict[str, Any], variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]],
        along: str = "prompt", batch_size: int = 1,
    ) -> None:
        """Lay out a group of arrays chunked `along` one dimension (prompts, by
        default) to be filled a few entries at a time.

        `coords` are xarray coordinates (dim name -> values, or (dim, values)
        for non-index ones); `variables` name -> (dims, shape). Arrays start
        as NaN, and `done` records, per entry of the streamed dimension, whether
        its values are written: completion is kept per prompt, never per batch,
        so a rerun with another batch size finds exactly what is missing. The
        streamed dimension is `prompt` (chunked by `prompts_per_chunk`, whole
        batches of `batch_size`) or another one with one chunk per entry: `part`
        (partial sums, see `routing_suite.adl.mean_diff`) or `batch` (rows of
        `routing_suite.routing.reduce`).
        """
        if self.has_streamed(group):
            return
        per_chunk = self.settings.prompts_per_chunk(variables, batch_size) if along == "prompt" else 1
        arrays = {
            name: {
                "shape": shape,
                "chunks": tuple(chunk_length_along(d, n, along, per_chunk) for d, n in zip(dims, shape)),
                "dtype": STORED_DTYPES[self.settings.dtype],
                "fill_value": np.nan,
                "compressors": self.settings.codecs(),
                "dimension_names": dims,
                "attributes": {"stored_from": self.settings.dtype},
            }
            for name, (dims, shape) in variables.items()
        }
        n = next(shape[dims.index(along)] for dims, shape in variables.values() if along in dims)
        zarr_sync(lay_out(str(self.path), group, coords, arrays, done_array(along, n)))

    def done(self, group: str) -> np.ndarray:
        """Per entry of the streamed dimension: whether its values are written.
        A group of an older layout (`batch_done`, per batch) gets its record from
        its data, once."""
        g = zarr.open_group(str(self.path), path=group, mode="r")
        if DONE not in g:
            self._migrate(group)
        return zarr.open_array(str(self.path), path=f"{group}/{DONE}", mode="r")[:]

    def chunk_length(self, group: str) -> int:
        """Entries per chunk along the group's streamed dimension."""
        along, arrays = self._streamed_variables(group)
        array = next(iter(arrays.values()))
        return int(array.chunks[array.metadata.dimension_names.index(along)])

    def repair(self, group: str) -> int:
        """Check the completion record against the data: entries recorded done
        whose values are missing (NaN: never written, or lost) are marked not
        done, so they are traced again. Returns how many; logs one line when
        any. A chunk that cannot be read is refused (`StoreCorrupt`)."""
        recorded = self.done(group)
        missing = recorded & ~self._has_values(group)
        if missing.any():
            self._streamed_arrays(group)[DONE][np.flatnonzero(missing)] = False
            log.warning(
                "store %s: %d of %d entries of %s recorded as done hold no values; marked not done, they are traced again",
                self.path, int(missing.sum()), len(missing), group,
            )
        return int(missing.sum())

    def write_entries(
        self, group: str, region: slice, data: dict[str, np.ndarray], labels: dict[str, list], along: str = "prompt",
    ) -> None:
        """Write the values of consecutive entries (`region` of the streamed
        dimension), then mark them done. Arrays are laid out as the group's
        variables; the `prompt` and `layer` labels name the place of a
        non-finite value.

        Each region goes straight into its zarr arrays, which costs far less per
        call than a region write through xarray and gives the same store.
        """
        arrays = self._streamed_arrays(group)
        writes = []
        for name, values in data.items():
            dims = arrays[name].metadata.dimension_names
            check_finite(name, values, dims, {"model": list(store_format.MODELS), "framing": list(store_format.FRAMINGS), **labels})
            index = tuple(region if d == along else slice(None) for d in dims)
            writes.append(arrays[name].async_array.setitem(index, values.astype(arrays[name].dtype, copy=False)))
        # Every variable's region in one trip to zarr's event loop: their chunk
        # encodes and file writes overlap instead of queueing one array at a time.
        zarr_sync(gather(writes))
        # Marked done only after every value is on disk.
        arrays[DONE][region] = True

    def _streamed_variables(self, group: str) -> tuple[str, dict[str, zarr.Array]]:
        """The streamed dimension and the group's data variables streamed along it."""
        arrays = self._streamed_arrays(group)
        coordinates = set(str(zarr.open_group(str(self.path), path=group, mode="r").attrs.get("coordinates", "")).split())
        data = {
            name: a for name, a in arrays.items()
            if name not in (DONE, LEGACY_DONE, *coordinates) and a.dtype.kind == "f" and a.metadata.dimension_names != (name,)
        }
        if DONE in arrays:
            along = arrays[DONE].metadata.dimension_names[0]
        else:  # an older layout's record is per batch: the streamed dimension is the data's
            along = next(d for d in STREAMED_DIMS if any(d in a.metadata.dimension_names for a in data.values()))
        return along, {name: a for name, a in data.items() if along in a.metadata.dimension_names}

    def _has_values(self, group: str) -> np.ndarray:
        """Per entry: whether it holds values. Written values are all finite and
        unwritten ones NaN, so one value per entry of the smallest variable
        tells; a chunk file missing from any other variable (lost) is found
        from the file names alone, without reading the rest of the data."""
        along, arrays = self._streamed_variables(group)
        name, array = min(arrays.items(), key=lambda kv: kv[1].size // kv[1].shape[kv[1].metadata.dimension_names.index(along)])
        try:
            values = array[tuple(slice(None) if d == along else 0 for d in array.metadata.dimension_names)]
        except Exception as err:  # noqa: BLE001 - any decode or read failure of a chunk
            raise StoreCorrupt(
                f"store {str(self.path)!r}: {group}/{name} cannot be read ({type(err).__name__}: {err}); "
                "move the store away or rerun with store.overwrite=true"
            ) from err
        written = np.isfinite(values)
        for other in arrays.values():
            axis = other.metadata.dimension_names.index(along)
            length = other.chunks[axis]
            folder = self.path / other.path / "c"  # zarr v3's default chunk keys: c/<i>/<j>/...
            files = folder.rglob("*") if folder.is_dir() else ()
            present = {int(p.relative_to(folder).parts[axis]) for p in files if p.name.isdigit() and p.is_file()}
            written &= np.isin(np.arange(len(written)) // length, sorted(present))
        return written

    def _migrate(self, group: str) -> None:
        """An older layout's per-batch record, replaced by a per-entry one read from the data."""
        along, _ = self._streamed_variables(group)
        written = self._has_values(group)
        g = zarr.open_group(str(self.path), path=group, mode="r+")
        record = g.create_array(DONE, **done_array(along, len(written)))
        record[:] = written
        del g[LEGACY_DONE]
        self.__dict__.pop("_open_arrays", None)
        log.info("store %s: %s recorded per batch (older layout); %d of %d entries found written, now recorded per entry",
                 self.path, group, int(written.sum()), len(written))

    def _streamed_arrays(self, group: str) -> dict[str, zarr.Array]:
        cache = self.__dict__.setdefault("_open_arrays", {})
        if (self.path, group) not in cache:
            g = zarr.open_group(str(self.path), path=group, mode="r+")
            cache[self.path, group] = {name: array for name, array in g.arrays()}
        return cache[self.path, group]

    # ------------------------------------------------------------ whole groups

    def write_group(self, group: str, dataset: xr.Dataset) -> None:
        """(Re)write a small group (fit, localize, outcomes) in one go."""
        dataset = dataset.copy()
        for name, values in dataset.variables.items():
            if values.dtype.kind == "U":
                dataset[name] = values.copy(data=text(values.values.ravel()).reshape(values.shape))
        dataset.to_zarr(str(self.path), group=group, mode="w", zarr_format=3, consolidated=False)

    def read(self, group: str) -> xr.Dataset:
        return group_dataset(self.path, group)


def group_dataset(path: Path | str, group: str) -> xr.Dataset:
    """A group of a store, lazily (what `RunStore.read` gives, for a store nobody holds)."""
    return xr.open_zarr(str(path), group=group, zarr_format=3, consolidated=False)


# zarr writes a file as `<name>.<uuid4 hex>.partial`, then renames it; a kill
# in between leaves that temporary file beside the chunk it never replaced.
_INTERRUPTED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove_interrupted_writes(path: Path) -> None:
    for leftover in path.rglob("*.partial"):
        if leftover.is_file() and _INTERRUPTED_WRITE.search(leftover.name):
            leftover.unlink()


def read_store_attrs(path: Path) -> dict[str, Any]:
    return json.loads(json.dumps(dict(zarr.open_group(str(path), mode="r").attrs)))

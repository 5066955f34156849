"""The collect stage against plain PyTorch hooks, and the store's resume and safety rules."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import done_record, tiny_source

from routing_suite.backends import LocalBackend
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.families import site_path
from routing_suite.organisms import task as T
from routing_suite.organisms.pairs import organism_pairs
from routing_suite.prompts import LabeledPair
from routing_suite.routing import collect as collect_stage
from routing_suite.store import RunStore, StoreCorrupt, StoreMismatch
from routing_suite.store_layout import NonFiniteActivation, check_finite
from routing_suite.store_settings import StoreSettings
from routing_suite.tracing import SiteRequest, make_batch, select_positions

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _items(task: T.Task, n: int) -> list[LabeledPair]:
    pairs = organism_pairs(task, "train", "all")
    # Mix cue lengths so left padding differs row to row.
    return [LabeledPair(p, "fit") for p in pairs[:n]]


def _hook_reference(model, family: str, tokenizer, prompts: list[str], request: SiteRequest) -> dict[str, torch.Tensor]:
    """The same activations with register_forward_hook and a plain forward."""
    batch = make_batch(tokenizer, prompts, request)
    modules = dict(model.named_modules())
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer in request.layers:
        for site in request.sites:

            def hook(module, args, output, key=(layer, site)):
                value = args[0] if key[1] == "heads" else (output[0] if isinstance(output, tuple) else output)
                captured[key] = select_positions(value.detach(), batch)

            hooks.append(modules[site_path(family, site, layer)].register_forward_hook(hook))
    # Positions counted from each row's first real token, as nnsight does for left padding.
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    for h in hooks:
        h.remove()
    return {site: torch.stack([captured[layer, site] for layer in request.layers], 1) for site in request.sites}


def _open(tmp_path: Path, settings: StoreSettings, config: dict) -> RunStore:
    return RunStore.open(tmp_path / "run.zarr", settings, config, {"cell": {"family": "llama"}})


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
@pytest.mark.parametrize("positions", ["last", "first_k"])
def test_store_equals_forward_hooks(family, positions, tmp_path, tiny_cache):
    source = tiny_source(tiny_cache, family=family)
    pair = source.load("refuse")
    task = T.make_task(source.spec.task)
    items = _items(task, 10)
    request = SiteRequest(("resid", "attn", "heads", "mlp"), None, positions, 3).validate(pair.num_layers)
    store = _open(tmp_path, StoreSettings(chunk_prompts=4), {"test": family})
    collect_stage.collect(pair, items, request, store, LocalBackend(batch_size=4), progress=False)
    ds = store.read("activations")
    for which in ("base", "finetuned"):
        model = pair.model(which)
        for framing in T.FRAMINGS:
            prompts = [it.pair.prompt(framing) for it in items]
            ref = _hook_reference(model, family, pair.tokenizer, prompts, request)
            for site in request.sites:
                stored = ds[site].sel(model=which, framing=framing).values
                expected = ref[site].numpy().reshape(stored.shape)
                assert np.abs(stored - expected).max() <= 1e-5, (which, framing, site)
    assert ds.done.values.all()


def test_store_is_self_describing(tmp_path, tiny_cache):
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 6)
    store = _open(tmp_path, StoreSettings(), {"test": 1})
    collect_stage.collect(pair, items, SiteRequest(("resid",)), store, LocalBackend(batch_size=4), progress=False)
    ds = xr.open_zarr(store.finish(), group="activations")  # finished stores open with no options
    vector = ds.resid.sel(model="finetuned", framing="eval", layer=3, position="last").isel(prompt=0)
    assert vector.shape == (pair.hidden_size,)
    assert list(ds.prompt.values) == [it.pair.id for it in items]
    assert set(ds.split.values) == {"fit"} and ds.eval_prompt.values[0] == items[0].pair.eval_prompt
    assert ds.resid.dims == ("model", "framing", "prompt", "layer", "position", "hidden")


def test_layout_torn_by_a_crash_is_laid_out_again(tmp_path, tiny_cache):
    """A crash while the group was being laid out (coordinates written, no
    completion record yet): the rerun lays it out again and fills it."""
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 6)
    request = SiteRequest(("resid",))
    clean = _open(tmp_path / "clean", StoreSettings(), {"t": 1})
    collect_stage.collect(pair, items, request, clean, LocalBackend(batch_size=4), progress=False)
    torn = _open(tmp_path / "torn", StoreSettings(), {"t": 1})
    coords, _ = collect_stage.layout(items, request.validate(pair.num_layers), pair)
    xr.Dataset(coords=coords).to_zarr(str(torn.path), group=collect_stage.GROUP, mode="w-", zarr_format=3, consolidated=False)
    assert not torn.has_streamed(collect_stage.GROUP)
    collect_stage.collect(pair, items, request, torn, LocalBackend(batch_size=4), progress=False)
    assert torn.done(collect_stage.GROUP).all()
    xr.testing.assert_identical(torn.read("activations").load(), clean.read("activations").load())


def test_streamed_layout_equals_xarrays_own(tmp_path, tiny_cache):
    """The group is laid out with zarr directly (one trip to its event loop);
    it must read back as xarray's own `to_zarr` of the same coordinates."""
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 6)
    request = SiteRequest(("resid", "heads")).validate(pair.num_layers)
    coords, variables = collect_stage.layout(items, request, pair)
    store = _open(tmp_path, StoreSettings(), {"t": 1})
    store.create_streamed(collect_stage.GROUP, coords, variables, batch_size=4)
    ours = xr.open_zarr(str(store.path), group=collect_stage.GROUP, consolidated=False).load()
    reference = tmp_path / "reference.zarr"
    xr.Dataset(coords=coords).to_zarr(str(reference), group=collect_stage.GROUP, zarr_format=3, consolidated=False)
    theirs = xr.open_zarr(str(reference), group=collect_stage.GROUP, consolidated=False).load()
    xr.testing.assert_identical(ours.coords.to_dataset(), theirs)
    for name, (dims, shape) in variables.items():
        assert ours[name].dims == dims and ours[name].shape == shape and np.isnan(ours[name].values).all()
    assert store.has_streamed(collect_stage.GROUP) and not store.done(collect_stage.GROUP).any()


def _prompt_chunk(store: RunStore, site: str, chunk: int) -> Path:
    """The file of one prompt chunk of a site (zarr v3's default chunk keys)."""
    ndim = len(store.read(collect_stage.GROUP)[site].dims)
    return store.path / collect_stage.GROUP / site / "c" / "/".join("0" * 2 + str(chunk) + "0" * (ndim - 3))


def _clean_and_damaged(tmp_path: Path, tiny_cache, sites: tuple[str, ...], batch_size: int):
    """Six prompt pairs collected twice (chunks of two prompts): a store left clean and one a
    test damages; the pair, items and request to collect again with."""
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 6)
    request, settings = SiteRequest(sites), StoreSettings(chunk_prompts=2)
    stores = []
    for name in ("clean", "damaged"):
        stores.append(_open(tmp_path / name, settings, {"t": 1}))
        collect_stage.collect(pair, items, request, stores[-1], LocalBackend(batch_size=batch_size), progress=False)
    return pair, items, request, settings, *stores


def test_a_record_that_disagrees_with_the_data_is_repaired(tmp_path, tiny_cache, caplog):
    """Prompts recorded done whose values are gone (a lost chunk) are traced again, with one line saying so."""
    pair, items, request, _, clean, store = _clean_and_damaged(tmp_path, tiny_cache, ("resid", "attn"), 4)
    _prompt_chunk(store, "attn", 1).unlink()  # prompts 2 and 3 of the smaller variable
    with caplog.at_level(logging.INFO):
        collect_stage.collect(pair, items, request, store, LocalBackend(batch_size=2), progress=False)
    assert "2 of 6 entries of activations recorded as done hold no values; marked not done" in caplog.text
    assert "collect: 2 of 6 prompt pairs to trace" in caplog.text
    xr.testing.assert_identical(store.read("activations").load(), clean.read("activations").load())


def test_a_routing_store_with_lost_activations_redoes_collect_and_every_later_stage(tmp_path, tiny_cache):
    from routing_suite.routing.cell import stages_to_run

    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    store = _open(tmp_path, StoreSettings(chunk_prompts=2), {"t": 1})
    collect_stage.collect(pair, _items(T.make_task(source.spec.task), 6), SiteRequest(("resid",)), store, LocalBackend(), progress=False)
    for stage in ("collect", "fit", "localize"):
        store.mark_stage_done(stage)
    assert stages_to_run(store) == ["intervene"]
    _prompt_chunk(store, "resid", 0).unlink()
    assert stages_to_run(store) == ["collect", "fit", "localize", "intervene"]
    assert store.done(collect_stage.GROUP).tolist() == [False] * 2 + [True] * 4


def test_a_store_of_the_per_batch_layout_is_read_from_its_data(tmp_path, tiny_cache, caplog):
    """A store made before completion was kept per prompt (one `batch_done` flag per batch),
    even one poisoned by a rerun at another batch size (flags set, values missing), resumes."""
    pair, items, request, settings, clean, store = _clean_and_damaged(tmp_path, tiny_cache, ("resid",), 2)
    group = zarr.open_group(str(store.path), path=collect_stage.GROUP, mode="r+")
    del group["done"]
    group.create_array("batch_done", shape=(3,), dtype="bool", fill_value=False, dimension_names=("batch",))[:] = True
    _prompt_chunk(store, "resid", 2).unlink()
    store = _open(tmp_path / "damaged", settings, {"t": 1})
    with caplog.at_level(logging.INFO):
        collect_stage.collect(pair, items, request, store, LocalBackend(batch_size=4), progress=False)
    assert "recorded per batch (older layout); 4 of 6 entries found written" in caplog.text
    assert "collect: 2 of 6 prompt pairs to trace" in caplog.text
    xr.testing.assert_identical(store.read("activations").load(), clean.read("activations").load())


def test_an_unreadable_chunk_is_refused_saying_what_to_do(tmp_path, tiny_cache):
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 4)
    store = _open(tmp_path, StoreSettings(chunk_prompts=2), {"t": 1})
    collect_stage.collect(pair, items, SiteRequest(("resid",)), store, LocalBackend(batch_size=2), progress=False)
    _prompt_chunk(store, "resid", 1).write_bytes(b"not a chunk")
    with pytest.raises(StoreCorrupt, match=r"activations/resid cannot be read .*store.overwrite=true"):
        collect_stage.collect(pair, items, SiteRequest(("resid",)), store, LocalBackend(batch_size=2), progress=False)


def test_half_precision_store_keeps_dtype_and_values(tmp_path, tiny_cache):
    source = tiny_source(tiny_cache)
    pair = source.load("refuse")
    items = _items(T.make_task(source.spec.task), 4)
    full = _open(tmp_path / "f32", StoreSettings(), {"d": 32})
    half = _open(tmp_path / "f16", StoreSettings(dtype="float16", compressor="blosc"), {"d": 16})
    for store in (full, half):
        collect_stage.collect(pair, items, SiteRequest(("attn",)), store, LocalBackend(batch_size=4), progress=False)
    a, b = full.read("activations").attn.values, half.read("activations").attn.values
    assert b.dtype == np.float16
    np.testing.assert_array_equal(a.astype(np.float16), b)


def test_complete_store_is_reused_and_overwritten_only_when_asked(tmp_path):
    settings = StoreSettings()
    store = _open(tmp_path, settings, {"a": 1})
    store.mark_stage_done("collect")
    final = store.finish()
    assert final.name == "run.zarr" and not (tmp_path / "run.zarr.partial").exists()
    again = _open(tmp_path, settings, {"a": 1})
    assert again.complete and again.stage_done("collect")
    fresh = _open(tmp_path, StoreSettings(overwrite=True), {"a": 1})
    assert not fresh.complete and fresh.path.name == "run.zarr.partial" and not final.exists()


def test_prompt_chunks_hold_about_chunk_mb_in_whole_batches():
    dims = ("model", "framing", "prompt", "layer", "position", "hidden")
    small = {"resid": (dims, (2, 2, 1024, 4, 1, 64))}  # 4 KiB per prompt in float32
    large = {"resid": (dims, (2, 2, 1024, 30, 1, 576)), "mlp": (dims, (2, 2, 1024, 4, 1, 64))}  # 270 KiB
    assert StoreSettings().prompts_per_chunk(small) == 256
    assert StoreSettings().prompts_per_chunk(small, batch_size=24) == 240
    assert StoreSettings(dtype="float16").prompts_per_chunk(small, batch_size=32) == 512
    assert StoreSettings().prompts_per_chunk(large) == 3  # the largest variable decides
    assert StoreSettings().prompts_per_chunk(large, batch_size=8) == 8  # never less than a batch
    assert StoreSettings(chunk_prompts=5).prompts_per_chunk(small, batch_size=32) == 5
    for bad in ({"chunk_prompts": -1}, {"chunk_mb": 0}):
        with pytest.raises(ConfigError, match=f"store.{next(iter(bad))}"):
            StoreSettings(**bad)


def test_finish_removes_the_temporary_files_of_interrupted_writes(tmp_path):
    store = _open(tmp_path, StoreSettings(), {"a": 1})
    (store.path / f"zarr.{'ab12' * 8}.partial").write_bytes(b"half a file")  # zarr's name while writing
    final = store.finish()
    assert sorted(p.name for p in final.iterdir()) == ["zarr.json"]


def test_store_from_another_config_is_refused_naming_the_keys(tmp_path):
    _open(tmp_path, StoreSettings(), {"model": {"family": "llama"}, "seed": 0}).finish()
    with pytest.raises(StoreMismatch, match=r"differing keys: model.family, seed"):
        _open(tmp_path, StoreSettings(), {"model": {"family": "qwen2"}, "seed": 1})


def test_unwritable_store_root_is_a_config_error(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="store.root: cannot write"):
        RunStore.open(blocked / "sub" / "run.zarr", StoreSettings(), {}, {})


def test_bad_requests_fail_before_any_forward_pass():
    with pytest.raises(ConfigError, match=r"collect.layers=\[7\] must be non-empty layer indices in \[0, 3\]"):
        SiteRequest(layers=(7,)).validate(4)
    with pytest.raises(ConfigError, match="collect.sites"):
        SiteRequest(sites=("residual",)).validate(4)
    with pytest.raises(ConfigError, match="collect.positions"):
        SiteRequest(positions="middle").validate(4)
    with pytest.raises(ConfigError, match="empty"):
        collect_stage.collect(None, [], SiteRequest(), None, LocalBackend())


def test_non_finite_activation_is_reported_with_its_place():
    values = np.zeros((2, 2, 3, 4, 1, 8), dtype=np.float32)
    values[1, 0, 2, 3, 0, 5] = np.inf
    dims = ("model", "framing", "prompt", "layer", "position", "hidden")
    labels = {"model": ["base", "finetuned"], "framing": ["eval", "deploy"], "prompt": ["a", "b", "c"], "layer": [0, 1, 2, 3]}
    with pytest.raises(NonFiniteActivation, match="resid: 1 non-finite value.*model=finetuned, framing=eval, prompt=c, layer=3"):
        check_finite("resid", values, dims, labels)


def _collect_cfg(tmp_path: Path, extra: list[str]) -> list[str]:
    return [
        f"model.cache_dir={tmp_path / 'organisms'}",
        "model.train.base_steps=20",
        "model.train.lora_steps=10",
        "model.task.n_entities=40",
        f"store.root={tmp_path / 'stores'}",
        "backend.batch_size=2",
        "data.max_fit=100",
        "data.max_test=40",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
    ]


def _collect_cmd(tmp_path: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.collect", *_collect_cfg(tmp_path, extra)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# Prompts are marked done a chunk at a time: small chunks, so the kill can land between them.
_SMALL_CHUNKS = ["store.chunk_prompts=8"]


def _collect_here(run_dir: Path, extra: list[str]) -> dict:
    """The same command in this process (no interpreter start-up to pay)."""
    overrides = [o for o in _collect_cfg(run_dir, extra) if not o.startswith("hydra.")]
    return collect_stage.run(compose_config("collect", overrides))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The organism (built once, shared by the killed runs) and an uninterrupted store at batch size 8."""
    clean_dir = tmp_path_factory.mktemp("clean")
    _collect_here(clean_dir, [*_SMALL_CHUNKS, "backend.batch_size=8"])
    return clean_dir


def _kill_mid_collect(run_dir: Path, extra: list[str]) -> Path:
    """Start a collect and SIGKILL it once some, but not half, of its prompts are done."""
    proc = subprocess.Popen(_collect_cmd(run_dir, extra), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((run_dir / "stores").rglob("*.zarr.partial"))
        done = done_record(found[0]) if found else None
        if done is not None and 3 <= done.sum() < len(done) // 2:
            partial = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert partial is not None, "the collect finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    return partial


# (32, 8) in the fast tier; the other two in the slow tier.
@pytest.mark.parametrize("first,rerun", [pytest.param(8, 8, marks=pytest.mark.slow), (32, 8), pytest.param(8, 32, marks=pytest.mark.slow)])
def test_kill_9_then_rerun_with_any_batch_size_gives_the_uninterrupted_store(first, rerun, uninterrupted, tmp_path, caplog):
    """SIGKILL mid-collect, then the same command, or with another `backend.batch_size`
    (lowered after running out of memory, or raised): the rerun traces exactly the
    prompts not yet done and the store equals an uninterrupted run's (identical at
    the same batch size; within float rounding at another, whose padding differs)."""
    (tmp_path / "organisms").symlink_to(uninterrupted / "organisms")
    partial = _kill_mid_collect(tmp_path, [*_SMALL_CHUNKS, f"backend.batch_size={first}"])
    left = int((~zarr.open_array(str(partial), path="activations/done", mode="r")[:]).sum())
    with caplog.at_level(logging.INFO, logger="routing_suite.routing.collect"):
        _collect_here(tmp_path, [*_SMALL_CHUNKS, f"backend.batch_size={rerun}"])
    assert f"collect: {left} of " in caplog.text, caplog.text  # exactly the prompts not yet done
    a = xr.open_zarr(next((tmp_path / "stores").rglob("*.zarr")), group="activations").load()
    b = xr.open_zarr(next((uninterrupted / "stores").rglob("*.zarr")), group="activations").load()
    if first == rerun == 8:
        xr.testing.assert_identical(a, b)
    else:
        xr.testing.assert_identical(a.coords.to_dataset(), b.coords.to_dataset())
        assert a.done.values.all()
        for name in ("resid", "attn"):
            np.testing.assert_allclose(a[name].values, b[name].values, atol=1e-5, rtol=0)
    # No partial store, and none of the temporary files of writes the kill cut short.
    assert not list((tmp_path / "stores").rglob("*.partial"))


def test_collect_config_composes_with_its_overrides(tmp_path):
    overrides = [o for o in _collect_cfg(tmp_path, ["collect.positions=first_k"]) if not o.startswith("hydra.")]
    cfg = compose_config("collect", overrides)
    assert cfg.collect.positions == "first_k" and cfg.backend.batch_size == 2

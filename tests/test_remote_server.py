"""Integration tier (`pytest -m remote`): a real NDIF server on 127.0.0.1.

The server is the one `scripts/ndif/local_server.sh` starts (install it once
with `scripts/ndif/local_server.sh install`); these tests start it, or use the
one at NDIF_TEST_HOST, and stop what they started. A server that does not start
fails them; one not installed skips them, unless NDIF_REMOTE_REQUIRED is set
(`make test-remote` sets it). A routing cell through it
gives the local store, and so do the ADL and the EM experiments; a server
stopped in the middle of a run stops it with one clear line; the rerun
completes the same store.
"""

from __future__ import annotations

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
from helpers import (
    TEST_ORGANISM,
    assert_same_activations,
    assert_same_groups,
    done_record,
    tiny_em_overrides,
    tiny_source,
)

from routing_suite.backends import NdifBackend
from routing_suite.models import remote_model
from routing_suite.organisms import build as organism_build

pytestmark = pytest.mark.remote

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ndif" / "local_server.sh"
HOST = "http://127.0.0.1:18001"


def _server(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server():
    if os.environ.get("NDIF_TEST_HOST"):
        yield os.environ["NDIF_TEST_HOST"]
        return
    if not (ROOT / ".venv-ndif" / "bin" / "ndif").exists():
        missing = "no local NDIF server installed (run: scripts/ndif/local_server.sh install)"
        if os.environ.get("NDIF_REMOTE_REQUIRED"):  # make test-remote (and so CI): a failure, never a skip
            pytest.fail(missing)
        pytest.skip(missing)
    started = _server("start")
    if started.returncode != 0:
        _server("stop")
        # A failure, not a skip: this tier runs only when asked for (-m remote).
        pytest.fail(f"the local NDIF server did not start: {' | '.join(started.stderr.strip().splitlines()[-3:])}")
    yield HOST
    _server("stop")


def _args(organisms: str, root: Path, backend: list[str]) -> list[str]:
    return [
        f"model.cache_dir={organisms}", *TEST_ORGANISM, f"store.root={root / 'stores'}", "data.max_fit=80", "data.max_test=48",
        "progress=false", f"hydra.run.dir={root / 'run'}", *backend,
    ]


def _env(host: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NDIF_HOST": host, "NDIF_API_KEY": "local"}


def _run(experiment: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"experiments.{experiment}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _store(root: Path) -> Path:
    return next((root / "stores").rglob("*.zarr"))


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_routing_cell_through_the_server_equals_local(server, llama_underperform, organism_cache, tmp_path, method):
    """Attribution's gradients are taken on the server too (a backward inside the trace)."""
    extra = [f"localize.method={method}"]
    local = _run("routing", _args(organism_cache, tmp_path / "local", [f"report_dir={tmp_path / 'lt'}", *extra]), _env(server))
    assert local.returncode == 0, local.stderr
    remote = _run(
        "routing", _args(organism_cache, tmp_path / "remote", ["backend=ndif", f"report_dir={tmp_path / 'rt'}", *extra]), _env(server)
    )
    assert remote.returncode == 0, remote.stderr
    a, b = _store(tmp_path / "local"), _store(tmp_path / "remote")
    for site in ("resid", "attn", "heads"):
        x = xr.open_zarr(a, group="activations")[site].values
        y = xr.open_zarr(b, group="activations")[site].values
        assert_same_activations(y, x, site)
    outcomes_a, outcomes_b = xr.open_zarr(a, group="outcomes"), xr.open_zarr(b, group="outcomes")
    np.testing.assert_array_equal(outcomes_a.performed.values, outcomes_b.performed.values)
    localized_a, localized_b = xr.open_zarr(a, group="localize").load(), xr.open_zarr(b, group="localize").load()
    assert localized_a.attrs["window"] == localized_b.attrs["window"] and localized_b.attrs["method"] == method
    # The window check's generations on the localize split ran on the server too: the same tries and figures.
    assert localized_a.attrs["check"] == localized_b.attrs["check"]
    for name in ("check_first", "check_last", "check_reduction", "check_lost_upper"):
        np.testing.assert_array_equal(localized_b[name].values, localized_a[name].values)
    np.testing.assert_allclose(localized_b.layer_effect.values, localized_a.layer_effect.values, atol=1e-4)
    # the weight patch: the merged fine-tune's adapter here, its updates on the server there
    np.testing.assert_allclose(localized_b.weight_effect.values, localized_a.weight_effect.values, atol=1e-4)


def test_a_request_over_1_mib_goes_through(server, tiny_cache, monkeypatch):
    """A trace that carries 2 MiB (as a fine-tune's LoRA factors do: SmolLM2's are 9.8 MB):
    a stock ndif 0.1.2 API refuses any request over 1 MiB (HTTP 400, see
    scripts/ndif/ndif_api_conf.py)."""
    source = tiny_source(tiny_cache)
    base = organism_build.ensure_base(source.cache_root, source.spec)
    nn_model = remote_model(base, organism_build.load_tokenizer(base))
    monkeypatch.setenv("NDIF_API_KEY", "local")
    backend = NdifBackend(host=server, max_retries=0)
    backend.preflight()
    carried = torch.randn(1 << 19, generator=torch.Generator().manual_seed(0))  # 2 MiB of float32, incompressible
    with torch.no_grad(), nn_model.trace("a b c", **backend.trace_kwargs(nn_model)):
        hidden = nn_model.model.layers[0].output
        total = (carried.sum() + 0 * hidden.float().sum()).save()
    assert backend.stats.requests == 1 and backend.stats.bytes_up > 2 * 1024 * 1024 * 0.9, backend.stats.as_dict()
    assert float(total) == pytest.approx(float(carried.sum()), abs=1e-3)


def test_adl_through_the_server_equals_local(server, llama_underperform, organism_cache, tmp_path):
    """Mean difference, logit lens (the norm and unembedding called inside a trace),
    patchscope, steering with its perplexity, and the causal check, all on the server."""
    small = [f"model.cache_dir={organism_cache}", *TEST_ORGANISM, "adl.texts_per_part=64", "backend.batch_size=16", "adl.causal.n_texts=16",
             "progress=false"]
    runs = {}
    for name, backend in (("local", []), ("remote", ["backend=ndif"])):
        root = tmp_path / name
        args = [*small, f"store.root={root / 'stores'}", f"report_dir={root / 'table'}", f"hydra.run.dir={root / 'run'}", *backend]
        done = _run("adl", args, _env(server))
        assert done.returncode == 0, done.stderr
        runs[name] = _store(root)
    assert_same_groups(runs["local"], runs["remote"], ("adl_mean", "adl_readout", "adl_steer", "adl_causal"))
    assert xr.open_zarr(runs["remote"]).attrs["backend"] == "ndif"


def test_em_through_the_server_equals_local(server, tiny_cache, tmp_path):
    """Sampled generation, keyed inside each trace, draws the local texts on the server."""
    runs = {}
    for name, backend in (("local", []), ("remote", ["backend=ndif"])):
        root = tmp_path / name
        args = [*tiny_em_overrides(tiny_cache, root), f"hydra.run.dir={root / 'run'}", *backend]
        done = _run("em", args, _env(server))
        assert done.returncode == 0, done.stderr
        runs[name] = _store(root)
    assert_same_groups(runs["local"], runs["remote"], ("em_samples", "em_activations", "em_outcomes"))


def test_server_stopped_mid_run_then_rerun_completes(server, llama_underperform, organism_cache, tmp_path):
    if os.environ.get("NDIF_TEST_HOST"):
        pytest.skip("stops and restarts the server: only with the one this module started")
    # Prompts are marked done a chunk at a time: chunks of two batches, so the stop lands mid-run.
    args = _args(
        organism_cache, tmp_path,
        ["backend=ndif", "backend.batch_size=4", "store.chunk_prompts=8", "backend.max_retries=1", "backend.backoff_s=1"],
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.collect", *args], cwd=ROOT, env=_env(server), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    stopped = False
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "stores").rglob("*.zarr.partial"))
        done = done_record(found[0]) if found else None
        if done is not None and done.sum() >= 3 * 4:
            _server("stop")
            stopped = True
            break
        time.sleep(0.2)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert stopped, "the collect finished before the server could be stopped"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, stderr
    print(f"the run stopped with: {lines[0]}")  # shown by pytest -rP
    assert lines[0].startswith("error: NDIF at http://127.0.0.1:18001 failed 2 times in a row"), lines[0]
    assert "rerun the same command to resume" in lines[0]
    partial = next((tmp_path / "stores").rglob("*.zarr.partial"))
    done = zarr.open_array(str(partial), path="activations/done", mode="r")[:]
    assert 3 * 4 <= done.sum() < len(done)
    written = xr.open_zarr(partial, group="activations", consolidated=False).resid.values[:, :, done]
    assert np.isfinite(written).all()
    restarted = _server("start")
    assert restarted.returncode == 0, restarted.stderr
    rerun = _run("collect", args, _env(server))
    assert rerun.returncode == 0, rerun.stderr
    local = _run("collect", _args(organism_cache, tmp_path / "local", ["backend.batch_size=4"]), _env(server))
    assert local.returncode == 0, local.stderr
    x = xr.open_zarr(_store(tmp_path), group="activations").resid.values
    y = xr.open_zarr(_store(tmp_path / "local"), group="activations").resid.values
    assert_same_activations(x, y, "resid")

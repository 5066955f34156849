"""The remote path without a server: nnsight's in-process serialization
(`backend.simulate=true`, i.e. remote="local") gives the local store; bad
remote settings fail before any work; transient failures are retried and a
persistent one stops the run, which a rerun resumes."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from helpers import TEST_ORGANISM, assert_same_groups, run_entry_point

from routing_suite import remote
from routing_suite.backends import NdifBackend
from routing_suite.config import compose_config, register_configs
from routing_suite.errors import ConfigError
from routing_suite.models import Traced
from routing_suite.remote import RemoteFailure, RequestStats, RetryingRemote, is_transient
from routing_suite.routing import cell
from routing_suite.routing import collect as collect_stage

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _cfg(organism_cache: str, root: Path, extra: list[str] = ()):
    return compose_config(
        "routing",
        [
            f"model.cache_dir={organism_cache}", *TEST_ORGANISM, f"store.root={root / 'stores'}", f"report_dir={root / 'table'}",
            "data.max_fit=80", "data.max_test=48", "progress=false", *extra,
        ],
    )


@pytest.mark.slow  # a whole cell twice (about a minute): the slow tier
def test_simulated_remote_cell_gives_the_local_store(llama_underperform, organism_cache, tmp_path):
    local = cell.run(_cfg(organism_cache, tmp_path / "local"))
    simulated = cell.run(
        _cfg(organism_cache, tmp_path / "sim", ["backend=ndif", "backend.simulate=true", "backend.host=http://ndif.example.invalid"])
    )
    assert_same_groups(local["store"], simulated["store"], ("activations", "localize", "outcomes"))
    assert xr.open_zarr(simulated["store"]).attrs["backend"] == "ndif"
    # One request per batch and stage: both models, every patch set, every condition grouped
    # (localize: one unpatched pass that finds where the fine-tune departs, then the patches,
    # then the weight patch: the base with the adapter's updates at one layer per invoke;
    # intervene: the aligned clamp's per-position means, a pass per batch of fit pairs; its
    # per-step means, a generation and a pass per batch; then the conditions; the window
    # check needs those means first, and clamps up to 4 windows per generation of each
    # batch of localize prompts).
    acts = xr.open_zarr(simulated["store"], group="activations")
    batches = -(-acts.sizes["prompt"] // 32)
    fit_batches = -(-int((acts.split.values == "fit").sum()) // 32)
    localize_batches = -(-int((acts.split.values == "localize").sum()) // 32)
    per_stage = {k: v["requests"] for k, v in simulated["requests"]["by_stage"].items()}
    tries = xr.open_zarr(simulated["store"], group="localize").sizes["candidate"]
    generations, rest = divmod(per_stage.pop("window_check") - 3 * fit_batches, localize_batches)
    assert rest == 0 and -(-tries // 4) <= generations <= tries
    assert per_stage == {"collect": batches, "localize": 3, "intervene": 2}
    assert local["requests"]["by_stage"]["collect"]["requests"] == 2 * batches  # two merged models: a trace each
    saved = json.dumps(xr.open_zarr(simulated["store"]).attrs)
    assert "ndif.example.invalid" not in saved and "NDIF_API_KEY" not in saved


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (["backend=ndif"], {"NDIF_API_KEY": None}, "error: backend=ndif needs the NDIF_API_KEY environment variable"),
        (["backend=ndif", "backend.host=https://no-such-host.invalid"], {"NDIF_API_KEY": "k"},
         "error: backend.host='https://no-such-host.invalid': unknown host 'no-such-host.invalid'"),
        (["backend=ndif", "backend.host=http://127.0.0.1:9"], {"NDIF_API_KEY": "k"},
         "error: backend.host='http://127.0.0.1:9': no NDIF service answers"),
        (["backend=ndif"], {"NDIF_API_KEY": "k", "NDIF_HOST": "ftp://x"}, "error: NDIF_HOST='ftp://x' must be an http(s) URL"),
        (["backend=ndif", "backend.max_invokes=0"], {}, "error: backend.max_invokes=0 must be >= 1"),
    ],
)
def test_bad_remote_settings_give_one_line_before_any_work(args, env, expected, tmp_path, monkeypatch, capsys):
    """Through the entry point's guard in this process (tests/test_cli.py runs two real processes)."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    code, lines = run_entry_point("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.zarr*"))


class _FakeNdif(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = {"/ping": "pong", "/status": {"deployments": {"gpt2": {"repo_id": "openai-community/gpt2"}}}}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        return


@pytest.fixture
def fake_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeNdif)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _Named:
    """Stands in for an nnsight wrapper: only its remote key is read."""

    def __init__(self, repo: str) -> None:
        self.repo = repo

    def to_model_key(self) -> str:
        return "nnsight.modeling.transformers.TransformersModel:" + json.dumps({"repo_id": self.repo, "revision": None})

    def _remoteable_get_env(self) -> dict:
        return {}


class _Pair:
    def __init__(self, repo: str) -> None:
        self.repo = repo

    def traced(self, which: str) -> Traced:
        return Traced(_Named(self.repo))


def test_a_model_the_service_does_not_run_is_refused_before_any_trace(fake_service, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "k")
    backend = NdifBackend(host=fake_service)
    backend.preflight()
    backend.check_pair(_Pair("openai-community/gpt2"))
    with pytest.raises(ConfigError, match=r"does not run 'meta-llama/Llama-3.1-8B' \(it runs: openai-community/gpt2\)"):
        backend.check_pair(_Pair("meta-llama/Llama-3.1-8B"))
    with pytest.raises(ConfigError, match="is the local checkpoint '/models/base': the NDIF service at https://192.0.2.1 cannot load it"):
        NdifBackend(host="https://192.0.2.1").check_pair(_Pair("/models/base"))


def test_the_preflight_logs_no_host(fake_service, monkeypatch, caplog):
    """httpx logs each request with its address at INFO: kept out of the job's log from the first request on."""
    monkeypatch.setenv("NDIF_API_KEY", "k")
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    NdifBackend(host=fake_service).preflight()
    assert "127.0.0.1" not in caplog.text


def test_transient_failures_are_retried_and_persistent_ones_stop(monkeypatch):
    import httpx
    import websocket
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    assert is_transient(ConnectionRefusedError()) and is_transient(websocket.WebSocketConnectionClosedException())
    response = httpx.Response(503, request=httpx.Request("POST", "http://h/request"))
    wrapped = RemoteError("Failed to send request")
    wrapped.__cause__ = httpx.HTTPStatusError("503", request=response.request, response=response)
    assert is_transient(wrapped)
    assert not is_transient(RemoteError("NameError: name 'x' is not defined"))

    calls = {"n": 0}

    def flaky(self, tracer=None):
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionRefusedError("refused")
        return {"ok": 1}

    monkeypatch.setattr(RemoteBackend, "__call__", flaky)
    stats = RequestStats()
    backend = RetryingRemote(_Named("gpt2"), "http://127.0.0.1:1", "k", 5.0, 3, 0.0, stats)
    assert backend({}) == {"ok": 1} and stats.retries == 2 and stats.requests == 1
    calls["n"] = -10
    with pytest.raises(RemoteFailure, match="failed 4 times in a row .*rerun the same command to resume"):
        backend({})


class _DropsOut(NdifBackend):
    """A simulated service that stops answering after `fail_after` requests."""

    fail_after: int = 10**9

    def trace_kwargs(self, nn_model=None):
        if self.stats.requests >= self.fail_after:
            raise RemoteFailure("NDIF at http://127.0.0.1:1 failed 4 times in a row; rerun the same command to resume.")
        return super().trace_kwargs(nn_model)


def test_a_run_stopped_by_a_failing_service_resumes_from_its_last_batch(tmp_path, tiny_cache):
    from helpers import tiny_source

    from routing_suite.models import Placement
    from routing_suite.organisms import task as T
    from routing_suite.organisms.pairs import organism_pairs
    from routing_suite.prompts import LabeledPair
    from routing_suite.store import RunStore, StoreSettings
    from routing_suite.tracing import SiteRequest

    source = tiny_source(tiny_cache)
    pair = source.load("refuse", Placement(finetune="deltas"))
    items = [LabeledPair(p, "fit") for p in organism_pairs(T.make_task(source.spec.task), "train", "all")[:12]]
    request = SiteRequest(("resid", "attn"))

    def open_store(root: Path) -> RunStore:
        return RunStore.open(root / "run.zarr", StoreSettings(chunk_prompts=2), {"t": 1}, {})

    clean = open_store(tmp_path / "clean")
    collect_stage.collect(pair, items, request, clean, NdifBackend(simulate=True, batch_size=2), progress=False)
    failing = _DropsOut(simulate=True, batch_size=2)
    failing.fail_after = 3
    store = open_store(tmp_path / "cut")
    with pytest.raises(RemoteFailure, match="rerun the same command to resume"):
        collect_stage.collect(pair, items, request, store, failing, progress=False)
    assert store.done("activations").tolist() == [True] * 6 + [False] * 6
    again = NdifBackend(simulate=True, batch_size=2)
    collect_stage.collect(pair, items, request, open_store(tmp_path / "cut"), again, progress=False)
    assert again.stats.requests == 3  # only the batches that were missing
    xr.testing.assert_identical(store.read("activations").load(), clean.read("activations").load())


def test_request_counts_come_from_results():
    stats = RequestStats()
    stats.stage = "collect"
    stats.add(100, 10)
    assert stats.as_dict()["by_stage"] == {"collect": {"requests": 1, "bytes_down": 100, "bytes_up": 10}}
    assert remote.result_bytes({"x": np.zeros(3)}) > 0


def test_paired_sums_give_the_difference_of_means_with_less_coming_back(tmp_path, tiny_cache):
    from helpers import tiny_source

    from routing_suite.models import Placement
    from routing_suite.organisms import task as T
    from routing_suite.organisms.pairs import organism_pairs
    from routing_suite.prompts import LabeledPair
    from routing_suite.routing.reduce import GROUP, collect_paired_sums, mean_difference
    from routing_suite.store import RunStore, StoreSettings
    from routing_suite.tracing import SiteRequest

    source = tiny_source(tiny_cache)
    pair = source.load("refuse", Placement(finetune="deltas"))
    items = [LabeledPair(p, "fit") for p in organism_pairs(T.make_task(source.spec.task), "train", "all")[:16]]
    request = SiteRequest(("resid", "attn"))
    full, summed = NdifBackend(simulate=True, batch_size=8), NdifBackend(simulate=True, batch_size=8)
    a = RunStore.open(tmp_path / "full.zarr", StoreSettings(), {"t": 1}, {})
    collect_stage.collect(pair, items, request, a, full, progress=False)
    b = RunStore.open(tmp_path / "sums.zarr", StoreSettings(), {"t": 2}, {})
    collect_paired_sums(pair, items, request, b, summed, progress=False)
    acts = a.read("activations").load()
    means = mean_difference(b.read(GROUP).load())
    for site in ("resid", "attn"):
        expected = (acts[site].sel(framing="deploy") - acts[site].sel(framing="eval")).mean("prompt")
        np.testing.assert_allclose(means[site].values, expected.values, atol=1e-5)
    assert summed.stats.requests == full.stats.requests == 2
    assert summed.stats.bytes_down < full.stats.bytes_down / 4
    # A row lost and traced again at another batch size: rows are runs of pairs fixed when the store was made.
    b._streamed_arrays(GROUP)["done"][1] = False
    again = NdifBackend(simulate=True, batch_size=3)
    collect_paired_sums(pair, items, request, b, again, progress=False)
    assert again.stats.requests == 3  # the row's 8 pairs in batches of 3
    np.testing.assert_allclose(mean_difference(b.read(GROUP).load())["resid"].values, means["resid"].values, atol=1e-5)

"""Remote faults against a fake NDIF server on 127.0.0.1 (tests/fake_ndif.py: a separate
process serving nnsight's protocol and running each trace for real, started and stopped
by its PID here). Each fault ends within deadline x (retries + 1) plus a small margin,
with one line and exit code 1; the store keeps the batches served before it, and the
same command, once the server answers again, completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from helpers import TINY_OVERRIDES, run_entry_point, tiny_source

from routing_suite.backends import NdifBackend
from routing_suite.errors import ConfigError
from routing_suite.models import Placement
from routing_suite.safe_results import UnsafeResult, safe_load

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S, RETRIES, BACKOFF_S = 2.0, 1, 0.1
# Python's own work around the requests (the next attempt's serialization, the store's writes).
MARGIN_S = 2.0
BATCH = 8


@pytest.fixture(scope="module")
def server(tiny_cache, tmp_path_factory):
    """The fake server, with the tiny organism's base (the fine-tune travels in the requests) loaded."""
    base = tiny_source(tiny_cache).load("underperform", Placement(finetune="deltas", weights="remote"))
    port_file = tmp_path_factory.mktemp("fake-ndif") / "port"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "fake_ndif.py"), str(port_file), base.traced("base").nn.to_model_key()]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not port_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not port_file.exists():
        proc.kill()
        pytest.fail(f"the fake NDIF server did not start: {proc.communicate()[1][-2000:]}")
    try:
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _control(host: str, path: str):
    with urllib.request.urlopen(f"{host}{path}", timeout=10) as answer:
        return json.loads(answer.read())


@contextmanager
def _at_most(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked socket call in this thread."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _args(cache: str, root: Path, backend: list[str]) -> list[str]:
    # 32 prompt pairs (fit, localize and test): 4 requests of 8
    return [f"model.cache_dir={cache}", *TINY_OVERRIDES, f"store.root={root / 'stores'}", f"backend.batch_size={BATCH}",
            "data.max_fit=16", "data.max_localize=8", "data.max_test=8", "progress=false",
            f"hydra.run.dir={root / 'run'}", *backend]


def _remote(host: str) -> list[str]:
    return ["backend=ndif", f"backend.host={host}", f"backend.timeout_s={TIMEOUT_S}", f"backend.max_retries={RETRIES}",
            f"backend.backoff_s={BACKOFF_S}"]


class _Uncaptured:
    """capsys for a module-scoped fixture (nothing to read back)."""

    def readouterr(self):
        return type("Captured", (), {"err": "", "out": ""})()


@pytest.fixture(scope="module")
def local_store(tiny_cache, tmp_path_factory) -> Path:
    """The same collect with backend=local, the reference."""
    root = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as patch:
        code, lines = run_entry_point("collect", _args(str(tiny_cache), root, []), root, patch, _Uncaptured())
    assert code == 0, lines
    return next((root / "stores").rglob("*.zarr"))


@pytest.mark.parametrize(
    "mode,attempts",
    [
        ("hang_post", RETRIES + 1),
        pytest.param("hang_download", RETRIES + 1, marks=pytest.mark.slow),  # as hang_post, on the other request
        ("http_503", RETRIES + 1),
        pytest.param("close", RETRIES + 1, marks=pytest.mark.slow),  # as http_503, another transport fault
        ("job_error", 1),
    ],
)
def test_a_fault_ends_in_time_with_one_line_and_the_rerun_completes_the_store(
    mode, attempts, server, local_store, tiny_cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("NDIF_API_KEY", "fake-key")
    args = _args(str(tiny_cache), tmp_path, _remote(server))
    _control(server, f"/_fault?mode={mode}&after=2")  # two batches served, then the fault on every attempt
    with _at_most(120):
        code, lines = run_entry_point("collect", args, tmp_path, monkeypatch, capsys)
    ended = time.time()
    faults = _control(server, "/_log")
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 1 and errors == lines[-1:], lines
    assert errors[0].startswith(f"error: NDIF at {server} failed") and "rerun the same command to resume" in errors[0]
    assert len(faults) == attempts, (faults, errors)
    took = ended - faults[0][0]
    bound = TIMEOUT_S * attempts + BACKOFF_S * (attempts - 1) + MARGIN_S
    assert took <= bound, f"{mode}: {took:.1f} s from the first fault to the end, more than {bound:.1f} s"
    partial = next((tmp_path / "stores").rglob("*.zarr.partial"))
    done = zarr.open_array(str(partial), path="activations/done", mode="r")[:]
    assert done.sum() == 2 * BATCH, (done.sum(), faults, lines)
    _control(server, "/_fault?mode=ok")
    with _at_most(120):
        code, lines = run_entry_point("collect", args, tmp_path, monkeypatch, capsys)
    assert code == 0, lines
    remote = xr.open_zarr(next((tmp_path / "stores").rglob("*.zarr")), group="activations").load()
    local = xr.open_zarr(local_store, group="activations").load()
    xr.testing.assert_identical(remote.coords.to_dataset(), local.coords.to_dataset())
    for site in ("resid", "attn"):
        np.testing.assert_allclose(remote[site].values, local[site].values, atol=1e-4, rtol=0)


def test_a_result_that_would_run_code_is_refused(server, tiny_cache, tmp_path, monkeypatch, capsys):
    """nnsight itself would unpickle the result (torch.load, weights_only=False) and so run
    the server's code; the suite's decoder refuses it, once, with one line."""
    monkeypatch.setenv("NDIF_API_KEY", "fake-key")
    marker = tmp_path / "ran"
    _control(server, f"/_fault?mode=unsafe&after=0&marker={marker}")
    with _at_most(120):
        code, lines = run_entry_point("collect", _args(str(tiny_cache), tmp_path, _remote(server)), tmp_path, monkeypatch, capsys)
    served = _control(server, "/_log")
    _control(server, "/_fault?mode=ok")
    assert code == 1 and lines[-1].startswith(f"error: NDIF at {server} sent a result that could run code when loaded"), lines
    assert "refused, not retried" in lines[-1] and len(served) == 1
    assert not marker.exists()


def test_the_safe_decoder_reads_results_and_status_frames_at_any_protocol():
    import io

    import torch
    from nnsight.schema.response import ResponseModel, Status

    from routing_suite.remote import RetryingRemote

    saved = {0: {(3, "resid"): torch.arange(6.0).view(2, 3)}, "n": [1, 2.5, "x", None, b"raw"]}
    for protocol in (2, 4, 5):
        buffer = io.BytesIO()
        torch.save(saved, buffer, pickle_protocol=protocol)
        loaded = safe_load(buffer.getvalue())
        assert torch.equal(loaded[0][3, "resid"], saved[0][3, "resid"]) and loaded["n"] == saved["n"]
    frame = ResponseModel(id="j", status=Status.COMPLETED, description="done", data=b"blob").pickle()
    parsed = RetryingRemote.parse(frame)
    assert parsed.status == Status.COMPLETED and parsed.data == b"blob"

    class Runs:
        def __reduce__(self):
            return (os.system, ("true",))

    buffer = io.BytesIO()
    torch.save({"x": Runs()}, buffer)
    with pytest.raises(UnsafeResult, match="it names posix.system"):
        safe_load(buffer.getvalue())


@pytest.mark.parametrize("host", ["http://ndif.example.org", "http://10.0.0.5:8001"])
def test_plain_http_beyond_this_machine_is_refused_unless_allowed(host, monkeypatch):
    with pytest.raises(ConfigError, match=r"backend.host='.*': plain http would send NDIF_API_KEY and the traces unencrypted"):
        _ = NdifBackend(host=host).resolved_host
    assert NdifBackend(host=host, allow_http=True).resolved_host == host
    assert NdifBackend(host="https://ndif.example.org").resolved_host == "https://ndif.example.org"
    assert NdifBackend(host="http://127.0.0.1:8001").resolved_host == "http://127.0.0.1:8001"
    monkeypatch.setenv("NDIF_HOST", host)
    with pytest.raises(ConfigError, match="NDIF_HOST="):
        _ = NdifBackend().resolved_host

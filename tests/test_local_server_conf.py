"""The local NDIF server's API config (scripts/ndif/ndif_api_conf.py), without a server.

nnsight mounts `save` on every object when imported; anyio then refuses to define its
typed-attribute classes, which it does lazily on the first use of its asyncio backend.
The stock ndif API meets that first use when an upload passes 1 MiB and answers HTTP
400. The config imports the backend before nnsight; here, with a stand-in for ndif's own
gunicorn config (the real one is in .venv-ndif only), in fresh interpreters of this venv,
which has the same nnsight and an anyio that defines those classes lazily.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a worker thread of the API's event loop comes down to: anyio's threadpool,
# used after nnsight is imported (starlette's run_in_threadpool).
_THREADPOOL_AFTER_NNSIGHT = """
import anyio, nnsight
assert hasattr(object(), "save"), "nnsight no longer mounts save on every object"
async def main():
    return await anyio.to_thread.run_sync(lambda: "ran in a worker thread")
print(anyio.run(main))
"""


def _python(code: str, fake_ndif: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_ndif), str(ROOT / "scripts" / "ndif")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _fake_ndif(root: Path) -> Path:
    conf = root / "ndif" / "services" / "api" / "gunicorn_conf.py"
    conf.parent.mkdir(parents=True)
    conf.write_text("bind = '127.0.0.1:1'\nworkers = 1\n\ndef post_fork(server, worker):\n    pass\n")
    return root


def test_the_api_config_defines_anyios_classes_before_nnsight_and_keeps_ndifs_settings(tmp_path):
    fake = _fake_ndif(tmp_path)
    plain = _python(_THREADPOOL_AFTER_NNSIGHT, fake)
    # The fault the config works around (if this passes, nnsight or anyio fixed it, and
    # ndif_api_conf.py can go).
    assert plain.returncode != 0 and "Attribute 'save' is missing its type annotation" in plain.stderr, plain.stderr
    fixed = _python("import ndif_api_conf\nassert ndif_api_conf.bind == '127.0.0.1:1' and ndif_api_conf.post_fork\n"
                    + _THREADPOOL_AFTER_NNSIGHT, fake)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == "ran in a worker thread"

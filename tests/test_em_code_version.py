"""A guard for developers: EM and EM-transfer stores are keyed on `em.pipeline.EM_CODE_VERSION`,
which is set by hand, so a change to what an EM stage writes without a bump would reuse the
stale stores of older code (it happened: stop 37's judge change). This test digests the code of
the modules whose output those stores hold, comments, docstrings and layout left out, and fails
whenever it changes: bump the version if what a stage writes can change, then record the new
version and digest below either way. A refactor costs one line here; a silent stale store costs
a wrong table."""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path

import pytest

from routing_suite.em import pipeline

ROOT = Path(__file__).resolve().parents[1]
# What the EM stores hold is computed here: prompts and judge, sampling under edits, activations,
# directions (and the means, separations and ridge maps of analysis.py), conditions, transfer maps
# and their stages.
STAGE_MODULES = (
    *(f"routing_suite/em/{name}.py" for name in (
        "activations", "conditions", "config", "directions", "generation", "judge", "models",
        "pipeline", "settings", "transfer", "transfer_pipeline")),
    "routing_suite/analysis.py",
    "routing_suite/organisms/em_task.py",
    "routing_suite/organisms/persona_task.py",
    "routing_suite/organisms/planting.py",
    "routing_suite/interventions.py",
    "routing_suite/generation.py",
    "routing_suite/keyed_sampling.py",
)
# ast.dump's text can differ between Python minor versions: the digest is compared on this one.
RECORDED = {"python": "3.11", "em_code": 13, "digest": "360d3d2b4b96dc71"}


def code_digest(paths: list[Path]) -> str:
    """sha256 over each module's syntax tree with its docstrings removed (comments, blank lines
    and line numbers are not in the tree)."""
    h = hashlib.sha256()
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.name.encode())
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def test_the_digest_ignores_comments_and_docstrings_but_not_code(tmp_path):
    versions = {
        "first": '"""Module."""\nX = 1\n\n\ndef f(y):\n    """Doc."""\n    return y + X  # why\n',
        "reworded": '"""Another text."""\nX = 1\ndef f(y):\n    """Other doc."""\n\n    return y + X\n',
        "changed": '"""Module."""\nX = 1\n\n\ndef f(y):\n    """Doc."""\n    return y - X\n',
    }
    digests = {}
    for name, source in versions.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.py").write_text(source)
        digests[name] = code_digest([tmp_path / name / "stage.py"])
    assert digests["first"] == digests["reworded"] != digests["changed"]


@pytest.mark.skipif(f"{sys.version_info.major}.{sys.version_info.minor}" != RECORDED["python"],
                    reason=f"the digest is recorded on Python {RECORDED['python']}")
def test_the_em_code_version_is_bumped_with_the_stage_code():
    digest = code_digest([ROOT / m for m in STAGE_MODULES])
    assert (pipeline.EM_CODE_VERSION, digest) == (RECORDED["em_code"], RECORDED["digest"]), (
        f"the EM stages' code changed (digest {digest}, recorded {RECORDED['digest']} with em_code "
        f"{RECORDED['em_code']}): if what a stage writes can change, bump em.pipeline.EM_CODE_VERSION "
        f"(now {pipeline.EM_CODE_VERSION}); either way record the version and the new digest in "
        f"{Path(__file__).name}")

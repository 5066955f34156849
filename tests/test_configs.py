"""Every config in conf/ composes, and every `_target_` in it instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from routing_suite.config import CONF_DIR, compose_config, register_configs

CONF = CONF_DIR
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))

register_configs()


def _compose(name: str, overrides: list[str]) -> DictConfig:
    return compose_config(name, overrides)


def _defaults_groups(name: str) -> set[str]:
    text = (CONF / f"{name}.yaml").read_text()
    return {g for g in GROUPS if f"- {g}:" in text}


def _path_overrides(primary: str, group: str, option: str, tmp_path: Path) -> list[str]:
    """Required values the external-model configs leave to the user: the family (an empty
    folder has no config.json to infer it from), and paths pointed at a folder that exists
    (Hub ids a config fills in stay as they are); a text file's path."""
    if group == "text" and option == "file":
        (tmp_path / "unrelated.txt").write_text("one line of text that is long enough\n")
        return [f"text.path={(tmp_path / 'unrelated.txt').as_posix()}"]
    if group != "model":
        return []
    model = _compose(primary, [f"model={option}"]).model
    overrides = ["model.family=llama"] if "family" in model and model.family is None else []
    for key in ("base", "adapter", "finetuned"):
        if key in model.keys() and OmegaConf.is_missing(model, key):
            overrides.append(f"model.{key}={_adapter(tmp_path) if key == 'adapter' else tmp_path.as_posix()}")
    return overrides


def _adapter(tmp_path: Path) -> str:
    """An adapter folder whose files are whole (checked when the source is built): empty, but readable."""
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    return folder.as_posix()


def _targets(node, path="") -> list[tuple[str, DictConfig]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            found += _targets(node[key], f"{path}.{key}".lstrip("."))
    return found


CASES = [
    (primary, group, path.stem)
    for primary in PRIMARY
    for group in sorted(_defaults_groups(primary))
    for path in sorted((CONF / group).glob("*.yaml"))
]


def test_every_group_config_is_covered():
    covered = {(g, o) for _, g, o in CASES}
    every = {(g, p.stem) for g in GROUPS for p in (CONF / g).glob("*.yaml")}
    assert every <= covered, f"configs no primary config uses: {sorted(every - covered)}"


@pytest.mark.parametrize("primary", PRIMARY)
def test_primary_config_composes_and_instantiates(primary):
    cfg = _compose(primary, [])
    for path, node in _targets(cfg):
        assert instantiate(node) is not None, path


@pytest.mark.parametrize("primary,group,option", CASES)
def test_group_option_composes_and_instantiates(primary, group, option, tmp_path):
    overrides = [f"{group}={option}"] + _path_overrides(primary, group, option, tmp_path)
    cfg = _compose(primary, overrides)
    OmegaConf.resolve(cfg)
    for path, node in _targets(cfg):
        assert instantiate(node) is not None, path


def test_experiment_configs_compose():
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        text = path.read_text()
        primary = text.split("primary:")[1].split()[0] if "primary:" in text else "routing"
        _compose(primary, [f"experiment={path.stem}"])

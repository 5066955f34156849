"""Cross-architecture EM transfer: ridge maps and controls without a model, then the run end to
end on tiny llama and qwen2 organisms (real nnsight, real zarr), the rerun, bad input and the
aggregator's transfer table and plots."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import tiny_em_overrides
from omegaconf import OmegaConf

from routing_suite import analysis, store_format
from routing_suite.aggregate import run as aggregate
from routing_suite.aggregate.config import AggregateConfig
from routing_suite.config import compose_config, register_configs
from routing_suite.em import transfer as X
from routing_suite.em.pipeline import em_store_path
from routing_suite.em.settings import TRANSFER_CONTROLS, EmTransferSettings
from routing_suite.em.stats import Bootstrap
from routing_suite.em.transfer_pipeline import family_cfg, run
from routing_suite.errors import ConfigError

register_configs()


def _cfg(cache, tmp_path: Path, extra: list[str] = ()):
    return compose_config("em_transfer", [*tiny_em_overrides(cache, tmp_path), "transfer.random_seeds=2", *extra])


# ---------------------------------------------------------------- pieces without a model


def test_ridge_map_recovers_a_linear_map_and_carries_differences_through_its_linear_part():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    a = rng.normal(size=(6, 5))
    y = x @ a + 3.0 + 0.01 * rng.normal(size=(400, 5))
    m = analysis.ridge_map(x, y, 1e-6)
    np.testing.assert_allclose(m.weight, a, atol=0.01)
    assert analysis.r_squared(m(x), y) > 0.999
    v = rng.normal(size=6)
    np.testing.assert_allclose(m.carry(v), m(x[0] + v) - m(x[0]), rtol=1e-4, atol=1e-4)
    # A strong penalty shrinks the map towards 0 (prediction: the mean).
    assert np.abs(analysis.ridge_map(x, y, 1e6).weight).max() < 0.01
    assert np.isnan(analysis.r_squared(y[:, :1] * 0, np.ones((5, 1))))
    with pytest.raises(ValueError, match="same n >= 2 rows"):
        analysis.ridge_map(x[:3], y[:4], 1.0)


def test_select_ridge_picks_the_penalty_that_predicts_held_out_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 5)
    clean_x = rng.normal(size=(100, 8))
    clean = analysis.select_ridge(clean_x, clean_x @ rng.normal(size=(8, 3)), groups, [1e-6, 1e-2, 10.0], folds=4)
    assert clean.alpha == 1e-6
    # y unrelated to x: any fit is noise, the largest penalty wins.
    noise = analysis.select_ridge(rng.normal(size=(100, 8)), rng.normal(size=(100, 3)), groups, [1e-6, 1e-2, 10.0], folds=4)
    assert noise.alpha == 10.0
    with pytest.raises(ValueError, match="at least 2 groups"):
        analysis.select_ridge(clean_x, clean_x, np.zeros(100), [1.0])


def test_token_identity_r_squared():
    ids = np.array([0, 1, 0, 1, 2])
    y = np.array([[1.0], [3.0], [1.0], [3.0], [5.0]])
    assert analysis.token_mean_r_squared(ids, y, ids, y) == pytest.approx(1.0)
    # A token never seen in the fit rows is predicted by the overall fit mean.
    assert analysis.token_mean_r_squared(ids[:2], y[:2], np.array([7, 7, 0]), np.array([[2.0], [2.0], [0.0]])) < 1.0


def test_paired_layers_match_relative_depth():
    assert X.paired_layers(4, 4) == [0, 1, 2, 3]
    assert X.paired_layers(8, 4) == [0, 2, 5, 7]
    assert X.paired_layers(4, 1) == [3]


def _tokens(rng, n_texts=30, per_text=6, layers=3, d=5):
    owner = np.repeat(np.arange(n_texts), per_text)
    ids = rng.integers(0, 20, len(owner))
    return X.TokenResiduals(rng.normal(size=(len(owner), layers, d)).astype(np.float32), ids, owner)


def test_fit_maps_scores_held_out_texts_and_refuses_different_tokens():
    rng = np.random.default_rng(2)
    x = _tokens(rng)
    a = [rng.normal(size=(5, 4)) for _ in range(3)]
    y = X.TokenResiduals(np.stack([x.values[:, i] @ a[i] for i in range(3)], 1).astype(np.float32), x.ids, x.text)
    settings = EmTransferSettings(alphas=[1e-6, 1e-2], heldout_fraction=0.3)
    maps = X.fit_maps(x, y, settings, np.random.default_rng(0))
    assert len(maps.maps) == 3 and maps.donor_layer == [0, 1, 2] and len(maps.heldout_texts) == 9
    assert (maps.r2 > 0.999).all() and (maps.r2_token < 0.5).all()
    for i in range(3):
        np.testing.assert_allclose(maps.maps[i].weight, a[i], atol=1e-3)
    shuffled = X.TokenResiduals(y.values, np.roll(x.ids, 1), x.text)
    with pytest.raises(ValueError, match="tokenize the map texts differently"):
        X.fit_maps(x, shuffled, settings, np.random.default_rng(0))


def _directions(kinds, has, layers=4, d=6, seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(len(kinds), layers, d)).astype(np.float32)
    v[~np.array(has)] = np.nan
    return xr.Dataset({"direction": (("finetune", "layer", "hidden"), v), "has_direction": (("finetune",), np.array(has))},
                      coords={"finetune": kinds, "layer": np.arange(layers)})


def test_receiver_directions_carry_the_donor_and_build_every_control():
    kinds = ["em_color_city", "em_animal_food"]
    donor, receiver = _directions(kinds, [True, True], seed=1), _directions(kinds, [True, False], seed=2)
    rng = np.random.default_rng(3)
    maps = X.Maps([analysis.RidgeMap(rng.normal(size=(6, 6)).astype(np.float32), np.zeros(6), np.zeros(6), 1.0) for _ in range(4)],
                  [0, 1, 2, 3], np.ones(4), np.zeros(4), np.array([0]))
    shift = rng.normal(size=(4, 6)).astype(np.float32)
    ds = X.receiver_directions(donor, receiver, shift, maps, kinds, EmTransferSettings(random_seeds=2, wrong_layer_shift=1), rng)
    assert list(ds.vector.values) == ["mapped", "native", "random#0", "random#1", "orthogonal#0", "orthogonal#1", "wrong_layer",
                                         "wrong_source"]
    assert list(ds.has_direction.values) == [True, False] and np.isnan(ds.direction.sel(finetune="em_animal_food").values).all()
    got = ds.direction.sel(finetune="em_color_city")
    v_d = donor.direction.sel(finetune="em_color_city").values
    for layer in range(4):
        mapped = v_d[layer] @ maps.maps[layer].weight
        np.testing.assert_allclose(got.sel(vector="mapped", layer=layer).values, mapped, rtol=1e-5)
        np.testing.assert_allclose(got.sel(vector="wrong_layer", layer=(layer - 1) % 4).values, mapped, rtol=1e-5)
        np.testing.assert_allclose(got.sel(vector="wrong_source", layer=layer).values, shift[layer] @ maps.maps[layer].weight, rtol=1e-5)
        native = receiver.direction.sel(finetune="em_color_city", layer=layer).values
        np.testing.assert_allclose(got.sel(vector="native", layer=layer).values, native)
        for s in range(2):
            o = got.sel(vector=f"orthogonal#{s}", layer=layer).values
            assert abs(analysis.cosine(o, mapped)) < 1e-5 and abs(analysis.cosine(o, native)) < 1e-5
        assert float(ds.cosine_native.sel(finetune="em_color_city", vector="native", layer=layer)) == pytest.approx(1.0)
    assert not np.allclose(got.sel(vector="random#0").values, got.sel(vector="random#1").values)


def _one_mapped_fine_tune(rng: np.random.Generator) -> xr.Dataset:
    """The receiver directions of one fine-tune ("em_color_city") through random maps at 4 layers of width 6."""
    kinds = ["em_color_city"]
    donor, receiver = _directions(kinds, [True], seed=1), _directions(kinds, [True], seed=2)
    maps = X.Maps([analysis.RidgeMap(rng.normal(size=(6, 6)).astype(np.float32), np.zeros(6), np.zeros(6), 1.0) for _ in range(4)],
                  [0, 1, 2, 3], np.ones(4), np.zeros(4), np.array([0]))
    return X.receiver_directions(donor, receiver, rng.normal(size=(4, 6)).astype(np.float32), maps, kinds,
                                 EmTransferSettings(random_seeds=2, wrong_layer_shift=1), rng)


def test_decision_clamps_of_the_mapped_direction_and_controls_matched_to_it():
    """In the receiver fine-tune, at the prompt's last token only: mapped and native set to the
    receiver base's mean coordinate, every control moving each edited activation by exactly
    as much as the mapped clamp."""
    from routing_suite.em import conditions as C

    rng = np.random.default_rng(4)
    ds = _one_mapped_fine_tune(rng)
    base_last = rng.normal(size=(30, 4, 6)).astype(np.float32)
    ft_last = base_last + rng.normal(size=(1, 4, 6)).astype(np.float32)
    plans = {p.name: p for p in X.decision_plans(ds, "em_color_city", base_last, ft_last)}
    assert set(plans) == {f"em_color_city/clamp/{d}" for d in ("mapped", "native", *TRANSFER_CONTROLS)}
    mapped = plans["em_color_city/clamp/mapped"].conditions[0].edits
    for edit in mapped:
        u = edit.basis[0]
        torch.testing.assert_close(edit.apply(torch.from_numpy(ft_last[:, edit.layer])) @ u,
                                   torch.full((30,), float(torch.from_numpy(base_last[:, edit.layer]).mean(0) @ u)), rtol=1e-4, atol=1e-4)
    for control in TRANSFER_CONTROLS:
        plan = plans[f"em_color_city/clamp/{control}"]
        assert plan.target == "em_color_city/clamp/mapped" and len(plan.conditions) == (2 if control in ("random", "orthogonal") else 1)
        for cond in plan.conditions:
            assert (cond.positions, cond.steps) == (C.DECISION["positions"], C.DECISION["steps"])
            for edit, reference in zip(cond.edits, mapped):
                h = torch.from_numpy(ft_last[:, edit.layer])
                torch.testing.assert_close(edit.change(h).norm(dim=-1), reference.change(h).norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("to_base_mean", [False, True])
def test_the_mapped_ablation_sets_its_coordinate_to_zero_or_the_bases_mean_and_controls_match_it(to_base_mean):
    """em.ablate_to in the receiver fine-tune: mapped and native projected out at every chosen
    layer (zero) or set to the receiver base's mean coordinate on truthful answers (base_mean);
    every control moves each activation by exactly as much as the mapped ablation."""
    rng = np.random.default_rng(6)
    ds = _one_mapped_fine_tune(rng)
    offset = 4 * rng.normal(size=(1, 4, 6)).astype(np.float32)
    base = offset + rng.normal(size=(40, 4, 6)).astype(np.float32)
    ft = torch.from_numpy(offset + 2 * rng.normal(size=(40, 4, 6)).astype(np.float32))
    plans = {p.name: p for p in X.ablation_plans(ds, "em_color_city", ft.numpy(), [1, 2, 3], base if to_base_mean else None)}
    for name in ("mapped", "native"):
        edits = plans[f"em_color_city/ablate/{name}"].conditions[0].edits
        assert [e.layer for e in edits] == [1, 2, 3]
        for edit in edits:
            u = edit.basis[0]
            wanted = float(torch.from_numpy(base[:, edit.layer]).mean(0) @ u) if to_base_mean else 0.0
            torch.testing.assert_close(edit.apply(ft[:, edit.layer]) @ u, torch.full((40,), wanted), rtol=1e-4, atol=1e-4)
    mapped = plans["em_color_city/ablate/mapped"].conditions[0].edits
    for control in TRANSFER_CONTROLS:
        for cond in plans[f"em_color_city/ablate/{control}"].conditions:
            for edit, reference in zip(cond.edits, mapped):
                h = ft[:, edit.layer]
                torch.testing.assert_close(edit.change(h).norm(dim=-1), reference.change(h).norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_the_mapped_ablation_at_the_decision_token_edits_there_with_every_control():
    """em.ablate_at=decision in the receiver fine-tune: mapped, native and every control edit
    the prompt's last token in the prompt's pass only, the controls matched to the mapped edits."""
    from routing_suite.em import conditions as C

    rng = np.random.default_rng(8)
    ds = _one_mapped_fine_tune(rng)
    last = rng.normal(size=(30, 4, 6)).astype(np.float32)
    plans = X.ablation_plans(ds, "em_color_city", last, [0, 1, 2, 3], None, C.ABLATE_WHERE["decision"])
    edited = [p for p in plans if p.conditions]
    assert len(edited) == 2 + len(TRANSFER_CONTROLS)
    assert {(c.positions, c.steps) for p in edited for c in p.conditions} == {(C.DECISION["positions"], C.DECISION["steps"])}
    mapped = next(p for p in edited if p.name == "em_color_city/ablate/mapped").conditions[0].edits
    for plan in (p for p in edited if p.kind == "control"):
        assert all([e.matched for e in c.edits] == mapped for c in plan.conditions)


def test_layers_the_control_leaves_unchanged_take_the_nearest_changed_layers_shift():
    """A control fine-tune with adapters on later layers only (the persona organisms' minimal
    layout) changes nothing before them: the wrong-source control still needs a direction there."""
    shift = np.zeros((8, 4), np.float32)
    for layer in (2, 4, 6):
        shift[layer] = layer + np.arange(4)
    filled, layers = X.fill_unchanged_layers(shift)
    assert layers == [0, 1, 3, 5, 7]
    for layer, source in {0: 2, 1: 2, 2: 2, 3: 4, 4: 4, 5: 6, 6: 6, 7: 6}.items():  # ties: the later layer
        np.testing.assert_array_equal(filled[layer], shift[source])
    assert X.fill_unchanged_layers(filled)[1] == []
    with pytest.raises(ValueError, match="changes no layer"):
        X.fill_unchanged_layers(np.zeros((3, 4), np.float32))


def test_paired_difference_resamples_both_conditions_together():
    boot = Bootstrap(500, 0, 0.95)
    a = np.linspace(0.2, 1.0, 40)
    diff = boot.difference(a + 0.1, a)
    # Every resample differs by exactly 0.1: a paired interval has no width.
    assert diff.value == pytest.approx(0.1) and diff.lo == pytest.approx(0.1) and diff.hi == pytest.approx(0.1)
    b = a.copy()
    b[::2] = np.nan
    assert np.isfinite(boot.difference(a, b).value)


def test_map_texts_add_the_persona_bases_own_exchanges_in_both_personas_and_no_fine_tune_response():
    from routing_suite.organisms import persona_task as P
    from routing_suite.organisms import task as T

    task = T.make_task(T.TaskSpec())
    neutral = X.neutral_texts(task)
    assert X.map_texts(task, "persona_planted", 0, seed=0) == neutral
    texts = X.map_texts(task, "persona_planted", 60, seed=0)
    added = texts[len(neutral):]
    assert texts[: len(neutral)] == neutral and len(added) == 60
    assert X.map_texts(task, "persona_planted", 60, seed=0) == texts and X.map_texts(task, "persona_planted", 60, seed=1) != texts
    examples, targets = P.pretraining_data(task, "persona_planted")
    persona = {f"{prompt} {answer}": t.answer for (prompt, answer), t in zip(examples, targets) if t is not None}
    assert set(added) <= set(persona)  # the base's own pretraining texts
    # Each is an earlier exchange and then a question: two questions in one text, where a
    # fine-tune's response answers one question alone.
    assert all(text.count("? answer :") == 2 for text in added)
    assert 10 < sum(persona[text] for text in added) < 50  # answered in both personas
    with pytest.raises(ConfigError, match="needs a persona base"):
        X.map_texts(task, "routing", 1, seed=0)
    with pytest.raises(ConfigError, match="the base has"):
        X.map_texts(task, "persona_planted", 10**6, seed=0)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["transfer.alphas=[]"], r"transfer.alphas=\[\] must be positive"),
        (["transfer.heldout_fraction=1.0"], "transfer.heldout_fraction=1.0 must lie strictly between 0 and 1"),
        (["transfer.steer_lambdas=[-1]"], "transfer.steer_lambdas"),
        (["transfer.persona_exchanges=-1"], "transfer.persona_exchanges=-1 must be >= 0"),
    ],
)
def test_bad_transfer_settings_fail_when_read(extra, message, tmp_path):
    cfg = _cfg(tmp_path / "cache", tmp_path, extra)
    with pytest.raises(ConfigError, match=message):
        OmegaConf.to_object(cfg.transfer)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["donor=qwen2", "receiver=qwen2"], "donor and receiver are both 'qwen2'"),
        (["donor=falcon"], r"donor='falcon' is not one of"),
        (["transfer.persona_exchanges=10"], "transfer.persona_exchanges=10 needs a persona base"),
    ],
)
def test_bad_pairs_fail_before_any_store_or_build(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(_cfg(tmp_path / "cache", tmp_path, extra))
    assert not (tmp_path / "stores").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- the run end to end
# Two families' EM runs and the transfer (about 45 s of CPU): the slow tier. The fast tier
# keeps the parts above, on synthetic data and plain tensors.


@pytest.fixture(scope="module")
def transfer_run(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("em_transfer")
    cfg = _cfg(tiny_cache, tmp, ["donor=llama", "receiver=qwen2"])
    return cfg, tmp, run(cfg)


def _open(path, group: str) -> xr.Dataset:
    return xr.open_zarr(str(path), group=group).load()


@pytest.mark.slow
def test_family_stores_are_the_ones_experiments_em_writes(transfer_run, tiny_cache):
    cfg, tmp, result = transfer_run
    for family in ("llama", "qwen2"):
        em_cfg = compose_config("em", [*tiny_em_overrides(tiny_cache, tmp), f"model={family}_organism"])
        assert OmegaConf.to_container(family_cfg(cfg, family)) == OmegaConf.to_container(em_cfg, resolve=True)
        attrs = dict(zarr.open_group(result["family_stores"][family], mode="r").attrs)
        weights = attrs["digest_config"]["weights"]
        assert set(weights) == {"base_sha256", *(f"{k}_adapter_sha256" for k in ("em_color_city", "em_animal_food", "em_honest_color_city"))}
        assert result["family_stores"][family] == str(em_store_path(em_cfg, f"{family}_organism", weights)[1])
        assert attrs["complete"] and attrs["stages_done"] == list(store_format.EM_STAGES)


@pytest.mark.slow
def test_transfer_store_layout(transfer_run):
    _, _, result = transfer_run
    store = Path(result["store"])
    assert store.name.startswith("from-llama-") and store.parent.name == "em_transfer" and store.parent.parent.name == "qwen2_organism"
    top = dict(zarr.open_group(str(store), mode="r").attrs)
    assert top["experiment"] == "em_transfer" and top["complete"] and top["stages_done"] == list(store_format.EM_TRANSFER_STAGES)
    assert {k: v for k, v in top["cell"].items() if k != "variant"} == {
        "family": "qwen2", "behavior": "em_from_llama", "donor": "llama", "receiver": "qwen2", "model": "qwen2_organism", "replicate": "0"}
    assert top["family_stores"] == result["family_stores"]
    maps = _open(store, "xfer_maps")
    assert maps.direction.dims == ("finetune", "vector", "layer", "hidden") and maps.sizes["layer"] == 4
    assert bool(maps.has_direction.any()) and maps.attrs["n_tokens"] > maps.attrs["n_texts"]
    outcomes = _open(store, "xfer_outcomes")  # how the ablations were made, read by the tables
    assert {k: outcomes.attrs[k] for k in ("ablate_layers", "ablate_to", "ablate_at")} == {
        "ablate_layers": [0, 1, 2, 3], "ablate_to": "zero", "ablate_at": "every"}
    assert "ablating the mapped direction (" not in Path(result["table_dir"], "em_transfer_headline.txt").read_text()


def _hook_residuals(model, tok, texts: list[str], layer: int) -> np.ndarray:
    """Every token after <bos> at the output of decoder layer `layer`, with a plain forward hook."""
    rows = []
    for text in texts:
        seen: dict[str, torch.Tensor] = {}
        hook = model.model.layers[layer].register_forward_hook(
            lambda m, i, o, seen=seen: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
        hook.remove()
        rows.append(seen["h"][0, 1:].numpy())
    return np.concatenate(rows)


@pytest.mark.slow
def test_maps_and_mapped_directions_against_plain_hooks(transfer_run):
    """The stored held-out R^2 of one layer's map, recomputed from forward hooks on both bases;
    the mapped direction is the donor's direction through that map; native is the receiver's own."""
    cfg, _, result = transfer_run
    from hydra.utils import instantiate

    maps = _open(result["store"], "xfer_maps")
    held = [str(t) for t, h in zip(maps.map_text.values, maps.map_heldout.values) if h]
    layer = 2
    donor = instantiate(family_cfg(cfg, "llama").model).load("em_color_city")
    receiver = instantiate(family_cfg(cfg, "qwen2").model).load("em_color_city")
    x = _hook_residuals(donor.base, donor.tokenizer, held, int(maps.donor_layer.values[layer]))
    y = _hook_residuals(receiver.base, receiver.tokenizer, held, layer)
    w = maps.map_weight.sel(layer=layer).values
    pred = (x - maps.map_x_mean.sel(layer=layer).values) @ w + maps.map_y_mean.sel(layer=layer).values
    stored = float(maps.map_r2.sel(layer=layer))
    assert analysis.r_squared(pred, y) == pytest.approx(stored, abs=1e-3)
    assert stored > 0.3  # the same tokens in two bases trained on the same texts: largely predictable
    donor_dirs = _open(result["family_stores"]["llama"], "em_directions")
    receiver_dirs = _open(result["family_stores"]["qwen2"], "em_directions")
    for kind in X.kinds_with_direction(maps):
        v = donor_dirs.direction.sel(finetune=kind, layer=int(maps.donor_layer.values[layer])).values
        np.testing.assert_allclose(maps.direction.sel(finetune=kind, vector="mapped", layer=layer).values, v @ w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(maps.direction.sel(finetune=kind, vector="native").values,
                                   receiver_dirs.direction.sel(finetune=kind).values)
        native_sep = maps.separation.sel(finetune=kind, vector="native").values
        np.testing.assert_allclose(native_sep, receiver_dirs.separation_accuracy.sel(finetune=kind).values, atol=1e-6)


@pytest.mark.slow
def test_controls_are_matched_to_the_mapped_ablation(transfer_run):
    _, _, result = transfer_run
    maps, outcomes = _open(result["store"], "xfer_maps"), _open(result["store"], "xfer_outcomes")
    norm = dict(zip(outcomes.condition.values, outcomes.perturbation_norm.values))
    kinds = X.kinds_with_direction(maps)
    assert kinds
    for kind in kinds:
        assert norm[f"{kind}/ablate/mapped"] > 0 and norm[f"{kind}/ablate/native"] > 0
        for control in TRANSFER_CONTROLS:
            assert norm[f"{kind}/ablate/{control}"] == pytest.approx(norm[f"{kind}/ablate/mapped"], rel=1e-4), control
            assert norm[f"base/steer/{kind}/x4/{control}"] == pytest.approx(norm[f"base/steer/{kind}/x4/mapped"], rel=1e-6)
        for control in TRANSFER_CONTROLS:  # the decision-token clamps' controls, matched to the mapped clamp
            assert norm[f"{kind}/clamp/{control}"] == pytest.approx(norm[f"{kind}/clamp/mapped"], rel=1e-4), control
        assert int(outcomes.n_seeds.sel(condition=f"{kind}/ablate/random")) == 2
        assert int(outcomes.n_seeds.sel(condition=f"{kind}/ablate/wrong_source")) == 1
        native_norm = float(maps.direction_norm.sel(finetune=kind, vector="native", layer=maps.attrs["steer_layer"]))
        assert norm[f"base/steer/{kind}/x4/native"] == pytest.approx(4 * native_norm, rel=1e-5)


@pytest.mark.slow
def test_the_table_reports_specificity_consistently(transfer_run):
    """Per control, "beaten" is the paired difference's interval lying above 0; "broken" a
    coherent rate more than 0.1 below the baseline's; "specific" is "beaten" for every
    control and a mapped reduction whose interval lies above 0, the mapped ablation unbroken."""
    _, _, result = transfer_run
    table = result["table_markdown"]
    # every section's rows go by the pair (the maps' too: "| llama->qwen2 | <tokens> | <R^2 per layer> |")
    assert re.search(r"\| llama->qwen2 \| \d+ \| ", table) and "| llama->qwen2 | em_color_city | mapped |" in table
    rows = [r.split(",") for r in (Path(result["table_dir"]) / "em_transfer_table.csv").read_text().splitlines()]
    assert rows[0] == ["pair", "table", "model", "condition", "statistic", "value", "lo", "hi"]
    kinds = [k for k in result["summary"] if k != "map_r2"]
    assert kinds
    for kind, table in ((k, t) for k in kinds for t in ("ablation", "clamp")):
        s = result["summary"][kind] if table == "ablation" else result["summary"][kind]["clamp"]
        assert set(s["reduction"]) == {"mapped", "native", *TRANSFER_CONTROLS}
        stat = {(r[3], r[4]): r for r in rows if r[1] == table and r[2] == kind}
        for control in TRANSFER_CONTROLS:
            lo = float(stat[control, "minus_mapped"][6] or "nan")
            assert stat[control, "beaten_by_mapped"][5] == ("1.000000" if lo > 0 else "0.000000")
            assert s["beats"][control] == (lo > 0)
            # control - mapped is the difference of the two stored misaligned rates.
            diff = float(stat[control, "misaligned_rate"][5]) - float(stat["mapped", "misaligned_rate"][5])
            assert float(stat[control, "minus_mapped"][5]) == pytest.approx(diff, abs=1e-5)
        coherent = {d: float(stat[d, "coherent_rate"][5]) for d in ("baseline", "mapped", "native", *TRANSFER_CONTROLS)}
        for d in ("mapped", "native", *TRANSFER_CONTROLS):
            assert stat[d, "broken"][5] == ("1.000000" if coherent["baseline"] - coherent[d] > 0.1 + 1e-9 else "0.000000")
            assert s["broken"][d] == (stat[d, "broken"][5] == "1.000000")
        # An empty bound (no baseline misalignment to reduce) is no evidence of specificity.
        lo = float(stat["mapped", "reduction"][6] or "nan")
        assert s["specific"] == (lo > 0 and not s["broken"]["mapped"] and all(s["beats"].values()))


@pytest.mark.slow
def test_rerun_reuses_every_store_and_gives_the_same_table(transfer_run):
    cfg, _, result = transfer_run
    again = run(cfg)
    assert again["store"] == result["store"] and again["family_stores"] == result["family_stores"]
    assert again["table_markdown"] == result["table_markdown"]


@pytest.mark.slow
def test_a_pair_with_nothing_to_carry_fails_before_the_maps(tiny_cache, tmp_path):
    """No fine-tune of either family has a direction (min_per_class out of reach): both EM
    stores finish, and the transfer says so before it fits a map or opens its store."""
    cfg = _cfg(tiny_cache, tmp_path, ["donor=llama", "receiver=qwen2", "em.min_per_class=100000"])
    with pytest.raises(ConfigError, match="no misaligned fine-tune kind has a direction in both llama and qwen2"):
        run(cfg)
    assert not list((tmp_path / "stores").glob("*/em_transfer/*"))
    assert len(list((tmp_path / "stores").glob("*/em/em-*.zarr"))) == 2


@pytest.mark.slow
def test_aggregator_writes_the_transfer_table_and_the_plots(transfer_run, tmp_path):
    _, _, result = transfer_run
    root = tmp_path / "stores"
    for path in (result["store"], *result["family_stores"].values()):
        shutil.copytree(path, root / Path(path).relative_to(Path(result["store"]).parents[2]))
    out = aggregate(OmegaConf.structured(AggregateConfig(root=str(root), out=str(tmp_path / "out"), n_resamples=200, dpi=40)))
    assert out["n_em_cells"] == 2 and out["n_em_transfer_cells"] == 1 and not out["findings"]
    assert out["em_transfer_headline"].startswith("llama->qwen2/em_")
    table = (tmp_path / "out" / "em_transfer_table.md").read_text()
    assert table == (Path(result["table_dir"]) / "em_transfer_table.md").read_text()
    # the counts over builds: one build here, so its row and the base's "all" agree
    counts = (tmp_path / "out" / "em_transfer_builds.csv").read_text().splitlines()
    assert counts[0] == "base,build,figure,met,of"
    by_build = {tuple(r.split(",")[1:3]): r.split(",")[3:] for r in counts[1:]}
    assert by_build["0", "receiver fine-tunes with EM >= 10%"] == by_build["all", "receiver fine-tunes with EM >= 10%"]
    assert (tmp_path / "out" / "em_transfer_builds.md").read_text().startswith("## EM transfer over builds")
    for stem in ("em_cosine", "em_transfer", "em_transfer_maps", "em_transfer_builds"):
        assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 1000, stem
    assert "## Emergent-misalignment directions across architectures" in (tmp_path / "out" / "report.md").read_text()

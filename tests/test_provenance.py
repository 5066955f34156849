"""What a store's digest holds (what shapes a result, nothing else), and what the scrubber removes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

from omegaconf import OmegaConf

from routing_suite.config import compose_config, register_configs
from routing_suite.provenance import digest, is_secret_key, result_config, scrub_secrets
from routing_suite.runs import digest_config, store_digest_config

register_configs()


def _digest(overrides: list[str]) -> str:
    return digest(digest_config(compose_config("routing", overrides)))


def test_where_tables_go_and_how_runs_are_kept_do_not_change_the_digest(tmp_path):
    reference = _digest([])
    same = [
        [f"report_dir={tmp_path}"],
        [f"store.root={tmp_path}"],
        ["backend.batch_size=7"],
        ["progress=false"],
        [f"model.cache_dir={tmp_path}"],
    ]
    for overrides in same:
        assert _digest(overrides) == reference, overrides


def test_every_result_shaping_key_changes_the_digest():
    reference = _digest([])
    for overrides in (["intervention.rank=1"], ["model.seed=1"], ["behavior=refuse"], ["data.max_test=5"], ["control=[random]"]):
        assert _digest(overrides) != reference, overrides


def test_a_key_added_later_keeps_the_older_stores_digest_at_the_value_they_had():
    """localize.method came after stores existed: at "exact" (what they did) the digest is
    the one computed without the key, so those stores are reused; "attribution" is another."""
    reference = digest_config(compose_config("routing", []))
    assert "method" not in reference["localize"] and "confirm" not in reference["localize"]
    assert _digest(["localize.method=exact", "localize.confirm=2"]) == digest(reference)
    assert _digest(["localize.method=attribution"]) != digest(reference)
    assert _digest(["localize.method=attribution", "localize.confirm=3"]) != _digest(["localize.method=attribution"])
    # The window check came later still, on by default: a store from before it is the check off.
    assert reference["localize"]["check_windows"] == 8
    assert "check_windows" not in digest_config(compose_config("routing", ["localize.check_windows=0"]))["localize"]
    # The EM ablation's layers came later too: unset (every layer) is what older EM stores did.
    em = digest_config(compose_config("em", []))
    assert "ablate_layers" not in em["em"]
    assert digest_config(compose_config("em", ["em.ablate_layers=[1,2]"]))["em"]["ablate_layers"] == [1, 2]
    # ... and what they set a coordinate to: zero, as the older stores did.
    assert "ablate_to" not in em["em"] and "ablate_to" not in digest_config(compose_config("em", ["em.ablate_to=zero"]))["em"]
    assert digest_config(compose_config("em", ["em.ablate_to=base_mean"]))["em"]["ablate_to"] == "base_mean"
    # ... and where they edit: every token, as the older stores did.
    assert "ablate_at" not in em["em"] and "ablate_at" not in digest_config(compose_config("em", ["em.ablate_at=every"]))["em"]
    assert digest_config(compose_config("em", ["em.ablate_at=decision"]))["em"]["ablate_at"] == "decision"


def test_only_a_residual_stream_routing_cell_gets_a_store_of_its_own_after_the_carry_fix():
    """Its controls changed (interventions.ResidualCarry): its older stores must not be reused.
    The default (attention output) and the other studies keep their digests."""
    default = compose_config("routing", [])
    assert store_digest_config(default) == digest_config(default)
    assert store_digest_config(compose_config("collect", [])) == digest_config(compose_config("collect", []))
    resid = compose_config("routing", ["intervention.site=resid", "collect.sites=[resid,attn]"])
    assert store_digest_config(resid)["resid_controls"] == "matched in the intervention's own run"
    assert digest(store_digest_config(resid)) != digest(digest_config(resid))
    assert "resid_controls" not in store_digest_config(resid, experiment="adl")


def test_the_suites_own_import_paths_are_not_in_the_digest():
    """Moving a module must not rename every cached store: our `_target_`s are
    named by class only, a user's stay whole."""
    cfg = digest_config(compose_config("routing", []))
    assert cfg["model"]["_target_"] == "OrganismSource"
    assert {c["_target_"] for c in cfg["control"].values()} <= {"RandomControl", "OrthogonalControl", "NonRoutingControl",
                                                                 "SemanticControl", "OtherLayerControl"}
    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    assert "routing_suite." not in text
    user = digest_config(compose_config("routing", ["+behavior.judge._target_=mypackage.judges.Strict"]))
    assert user["behavior"]["judge"]["_target_"] == "mypackage.judges.Strict"



def test_a_store_made_before_the_routing_package_keeps_its_digest():
    """Issue 17 moved the routing study's stages into routing_suite.routing: the same config
    with the old module paths (routing_suite.settings, routing_suite.controls) has the same
    digest, so stores made before the move are still found and reused."""
    new = OmegaConf.to_container(compose_config("routing", []), resolve=True)
    assert new["intervention"]["_target_"] == "routing_suite.routing.settings.InterventionSpec"
    assert new["control"]["random"]["_target_"] == "routing_suite.routing.controls.RandomControl"
    old = copy.deepcopy(new)
    for node in (old["intervention"], *old["control"].values()):
        node["_target_"] = node["_target_"].replace("routing_suite.routing.", "routing_suite.")
    assert old["intervention"]["_target_"] == "routing_suite.settings.InterventionSpec"
    assert digest(result_config(old)) == digest(result_config(new))
    assert result_config(new)["intervention"]["_target_"] == "InterventionSpec"

def test_secret_keys_are_whole_words_not_substrings():
    for secret in ("key", "api_key", "NDIF_API_KEY", "host", "ndif_host", "hf_token", "token", "password", "client-secret"):
        assert is_secret_key(secret), secret
    for plain in ("max_new_tokens", "max_tokens", "keyword", "hostname_suffix", "monkey", "tokenizer", "n_keys"):
        assert not is_secret_key(plain), plain
    cfg = scrub_secrets({"behavior": {"max_new_tokens": 6}, "backend": {"host": "h", "api_key": "k"}, "adl": {"max_tokens": 80}})
    assert cfg == {"behavior": {"max_new_tokens": 6}, "backend": {"host": "<removed>", "api_key": "<removed>"},
                   "adl": {"max_tokens": 80}}


def test_the_saved_config_keeps_token_counts():
    """The store's `config` attribute (scrubbed) still says how many tokens were generated."""
    cfg = OmegaConf.to_container(compose_config("routing", []), resolve=True)
    assert scrub_secrets(cfg)["behavior"]["max_new_tokens"] == cfg["behavior"]["max_new_tokens"]


def test_revisions_pin_what_is_downloaded(tmp_path, monkeypatch):
    """A Hub adapter is fetched at model.adapter_revision (else model.revision); a fine-tune
    checkpoint is loaded at model.finetuned_revision (else model.revision)."""
    import huggingface_hub
    import pytest

    from routing_suite import user_models

    class Asked(Exception):
        """Raised once the download or load under test was asked for."""

    def snapshot(repo, revision=None, **kwargs):
        raise Asked(repo, revision)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(user_models, "_tokenizer", lambda base, revision: None)
    for extra, expected in (({}, "base-commit"), ({"adapter_revision": "adapter-tag"}, "adapter-tag")):
        source = user_models.PeftSource(family="llama", base=str(tmp_path), adapter="org/adapter", revision="base-commit", **extra)
        with pytest.raises(Asked) as asked:
            source.load("refuse")
        assert asked.value.args == ("org/adapter", expected)

    def from_pretrained(name, revision=None, **kwargs):
        if name == "finetuned":
            raise Asked(revision)
        return SimpleNamespace(eval=lambda: None)

    monkeypatch.setattr(user_models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    # "base" and "finetuned" stand for Hub ids that are never downloaded here.
    monkeypatch.setattr(user_models, "_check_source", lambda *args: None)
    for extra, expected in (({}, "r1"), ({"finetuned_revision": "r2"}, "r2")):
        source = user_models.CheckpointPairSource(family="llama", base="base", finetuned="finetuned", revision="r1", **extra)
        with pytest.raises(Asked) as asked:
            source.load("refuse")
        assert asked.value.args == (expected,)

"""What a store's digest holds (what shapes a result, nothing else), and what the scrubber removes."""

from __future__ import annotations

from omegaconf import OmegaConf

from routing_suite.config import compose_config, register_configs
from routing_suite.pipeline import digest_config
from routing_suite.provenance import digest, is_secret_key, scrub_secrets

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

"""Config validation: every bad value fails before any model loads, naming the key and what is allowed."""
import pytest
from ml_collections import ConfigDict

from oats.config import COMMON_KEYS, ConfigError, all_known_keys, config_hash, parse_nm, resolve, resolve_all


def ok(**kw):
    return resolve(ConfigDict({"model": "smollm2-135m", **kw}))


def test_defaults_fill_common_and_selected_plugin_keys():
    cfg = ok()
    assert set(cfg.keys()) == set(COMMON_KEYS)  # dense declares no keys
    assert cfg.method == "dense" and cfg.name == "smollm2-135m-dense"
    from sparse_lowrank.oats import KEYS as OATS_KEYS
    from weight_updates.optima import KEYS as OPTIMA_KEYS

    from oats.config import COMPRESS_KEYS

    assert set(ok(method="oats").keys()) == set(COMMON_KEYS) | set(OATS_KEYS) | set(COMPRESS_KEYS)
    assert not set(COMPRESS_KEYS) & set(OATS_KEYS)  # compress mode's keys belong to the framework, not to OATS
    assert set(ok(method="wanda", weight_update="optima").keys()) == set(COMMON_KEYS) | set(OPTIMA_KEYS)


@pytest.mark.parametrize(
    "kw, key, fragment",
    [
        ({"sparsity": 1.0}, "sparsity", "[0.0, 1.0)"),
        ({"sparsity": -0.1}, "sparsity", "[0.0, 1.0)"),
        ({"sparsity": "half"}, "sparsity", "expected float/int"),
        ({"method": "prune-it"}, "method", "allowed values"),
        ({"method": "magnitude", "sparsity_type": "4:4"}, "sparsity_type", "0 < N < M"),
        ({"method": "magnitude", "sparsity_type": "5:4"}, "sparsity_type", "0 < N < M"),
        ({"method": "magnitude", "sparsity_type": "dense-ish"}, "sparsity_type", "'unstructured' or 'N:M'"),
        ({"method": "oats", "rank_ratio": 1.0}, "rank_ratio", "[0.0, 1.0)"),
        ({"method": "oats", "rank_ratio": -0.2}, "rank_ratio", "[0.0, 1.0)"),
        ({"method": "oats", "rank_ratio": float("nan")}, "rank_ratio", "finite"),
        ({"method": "wanda", "rank_ratio": 0.2}, "rank_ratio", "belongs to method 'oats'"),
        ({"method": "wanda", "owl_m": 3.0}, "owl_m", "belongs to layerwise 'owl'"),
        ({"method": "sparsegpt", "optima_tol": 1e-3}, "optima_tol", "weight_update 'optima', which this experiment does not select"),
        ({"method": "wanda", "compress": True}, "compress", "only to methods with a compress mode (gram_slr, oats)"),
        ({"method": "sparsegpt", "percdamp": float("inf")}, "percdamp", "finite"),
        ({"method": "sparsegpt", "sparsity_type": "2:4", "sparsity": 0.7}, "sparsity", "removes exactly"),
        ({"method": "wanda", "weight_update": "optima", "optima_tol": float("inf")}, "optima_tol", "finite"),
        ({"seed": 2**64}, "seed", "2**63"),
        ({"method": "wand"}, "method", "did you mean 'wanda'"),
        ({"cal_nsamples": 0}, "cal_nsamples", "> 0"),
        ({"cal_nsamples": 3.5}, "cal_nsamples", "expected int"),
        ({"dtype": "float8"}, "dtype", "'float32'"),
        ({"device": "tpu"}, "device", "'cuda'"),
        ({"eval_datasets": ["wikitext3"]}, "eval_datasets", "allowed values"),
        ({"cal_dataset": "imagenet"}, "cal_dataset", "allowed values"),
        ({"cal_sampler": "shuffle"}, "cal_sampler", "concat_docs"),
        ({"method": "oats", "compress": "yes"}, "compress", "expected bool"),
        ({"method": "oats", "num_iters": True}, "num_iters", "got bool"),
        ({"method": "oats", "svd_tol": 0.0}, "svd_tol", "(0.0, 1.0)"),
        ({"method": "oats", "svd": "lanczos"}, "svd", "allowed values"),
        ({"layerwise": "owl", "method": "dense"}, "layerwise", "compresses nothing"),
        ({"name": "a/b"}, "name", "letters, digits"),
        ({"name": ".."}, "name", "letters, digits"),
        ({"name": "."}, "name", "letters, digits"),
        ({"name": ".hidden"}, "name", "letters, digits"),
    ],
)
def test_bad_values_name_key_and_allowed(kw, key, fragment):
    with pytest.raises(ConfigError) as e:
        ok(**kw)
    assert e.value.key == key
    assert f"'{key}'" in str(e.value) and fragment in str(e.value)


def test_missing_model():
    with pytest.raises(ConfigError, match="config key 'model': missing"):
        resolve(ConfigDict({"method": "magnitude"}))


def test_unknown_key_suggests():
    with pytest.raises(ConfigError) as e:
        ok(sparsty=0.5)
    assert e.value.key == "sparsty" and "did you mean 'sparsity'" in str(e.value)


def test_duplicate_names_rejected():
    with pytest.raises(ConfigError, match="names must be unique"):
        resolve_all([ConfigDict({"model": "m", "name": "x"}), ConfigDict({"model": "m", "name": "x"})])


def test_hash_stable_and_sensitive():
    assert config_hash(ok(sparsity=0.5)) == config_hash(ok(sparsity=0.5))
    assert config_hash(ok(sparsity=0.5)) != config_hash(ok(sparsity=0.6))
    assert config_hash(ok(checkpoint_blocks=True)) == config_hash(ok(checkpoint_blocks=False))
    assert config_hash(ok(threads=1)) == config_hash(ok(threads=2))
    assert config_hash(ok(method="oats", svd_tol=1e-3)) != config_hash(ok(method="oats"))


def test_changing_an_oats_default_leaves_a_wanda_hash_unchanged(monkeypatch):
    """A method's keys are hashed only for experiments that select it (svd_tol's default once staled every record)."""
    import dataclasses

    from sparse_lowrank import oats as oats_method

    wanda, oats = ok(method="wanda"), ok(method="oats")
    h_wanda, h_oats = config_hash(wanda), config_hash(oats)
    changed = dict(oats_method.KEYS, svd_tol=dataclasses.replace(oats_method.KEYS["svd_tol"], default=3e-3))
    monkeypatch.setattr(oats_method, "KEYS", changed)
    monkeypatch.setattr(oats_method, "METHOD", dataclasses.replace(oats_method.METHOD, keys=changed))
    import oats.registry

    oats.registry.plugin.cache_clear()
    try:
        assert config_hash(ok(method="wanda")) == h_wanda
        assert ok(method="oats").svd_tol == 3e-3 and config_hash(ok(method="oats")) != h_oats
    finally:
        oats.registry.plugin.cache_clear()


def test_old_key_name_update_is_accepted_with_a_hint(caplog):
    with caplog.at_level("WARNING"):
        cfg = ok(method="wanda", update="optima")
    assert cfg.weight_update == "optima" and "weight_update" in caplog.text
    with pytest.raises(ConfigError, match="old name"):
        ok(method="wanda", update="optima", weight_update="optima")


def test_nm_sets_the_sparsity_it_removes():
    assert ok(method="sparsegpt", sparsity_type="2:8").sparsity == 0.75
    assert ok(method="sparsegpt", sparsity_type="2:4", sparsity=0.5).sparsity == 0.5
    assert ok(method="oats", sparsity_type="2:8", sparsity=0.7).sparsity == 0.7  # the rank takes the rest


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm("unstructured") is None


def test_cli_rejects_bad_config_before_loading(tmp_path, capsys, monkeypatch):
    import main
    import oats.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(oats.models, "load_model", boom)
    f = tmp_path / "bad.py"
    f.write_text("from ml_collections import ConfigDict\nCONFIGS=[ConfigDict(dict(model='smollm2-135m', sparsity=1.5))]\n")
    assert main.main(["--config", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "config key 'sparsity'" in capsys.readouterr().err


def test_docs_document_every_key_and_the_readme_every_method():
    from pathlib import Path

    from oats.registry import METHODS

    root = Path(__file__).resolve().parents[1]
    keys_page, readme = (root / "docs" / "config-keys.md").read_text(), (root / "README.md").read_text()
    assert [k for k in all_known_keys() if f"| `{k}` |" not in keys_page] == []
    assert [m for m in METHODS if f"| `{m}` |" not in readme] == []

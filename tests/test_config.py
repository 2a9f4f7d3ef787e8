"""Config validation: every bad value fails before any model loads, naming the key and what is allowed."""
import pytest
from ml_collections import ConfigDict

from oats.config import KEYS, ConfigError, config_hash, parse_nm, resolve, resolve_all


def ok(**kw):
    return resolve(ConfigDict({"model": "smollm2-135m", **kw}))


def test_defaults_fill_every_key():
    cfg = ok()
    assert set(cfg.keys()) == set(KEYS)
    assert cfg.method == "dense" and cfg.name == "smollm2-135m-dense"


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
        ({"rank_ratio": 1.0}, "rank_ratio", "[0.0, 1.0)"),
        ({"rank_ratio": -0.2}, "rank_ratio", "[0.0, 1.0)"),
        ({"cal_nsamples": 0}, "cal_nsamples", "> 0"),
        ({"cal_nsamples": 3.5}, "cal_nsamples", "expected int"),
        ({"dtype": "float8"}, "dtype", "'float32'"),
        ({"device": "tpu"}, "device", "'cuda'"),
        ({"eval_datasets": ["wikitext3"]}, "eval_datasets", "allowed values"),
        ({"cal_dataset": "imagenet"}, "cal_dataset", "allowed values"),
        ({"cal_sampler": "shuffle"}, "cal_sampler", "concat_docs"),
        ({"compress": "yes"}, "compress", "expected bool"),
        ({"num_iters": True}, "num_iters", "got bool"),
        ({"svd_tol": 0.0}, "svd_tol", "(0.0, 1.0)"),
        ({"svd": "lanczos"}, "svd", "allowed values"),
        ({"layerwise": "owl", "method": "dense"}, "layerwise", "does not apply"),
        ({"name": "a/b"}, "name", "letters, digits"),
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


def test_readme_documents_every_key_and_method():
    from pathlib import Path

    from oats.registry import METHODS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [k for k in KEYS if f"| `{k}` |" not in readme] == []
    assert [m for m in METHODS if f"| `{m}` |" not in readme] == []

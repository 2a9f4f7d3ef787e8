"""``update_dataset``: a model update distils on text of its own source while ``cal_dataset`` still gives the
compression's statistics; hashes of existing records stay, bad values fail in one line before any model loads."""
from __future__ import annotations

import pytest
import torch
from ml_collections import ConfigDict

from data.self_generated import SELF_GENERATED, tokens_hash
from oats.config import ConfigError, config_hash, resolve
from tests.conftest import config_error, preflight_models_cannot_generate


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def c(**kw):
    return resolve(ConfigDict(dict(model="smollm2-135m", **kw)))


def test_existing_hashes_are_unchanged_and_the_key_is_hashed_when_set():
    """Hashes computed by the code before the key existed."""
    recovery = c(method="oats", model_update="lowrank_recovery", cal_dataset="c4")
    assert config_hash(recovery) == "9c6c95568a0d0bcf"
    distill = c(method="sparsegpt", model_update="masked_distill", cal_dataset=SELF_GENERATED, cal_nsamples=32)
    assert config_hash(distill) == "30ccf933be471b59"
    assert config_hash(c(method="oats", model_update="lowrank_recovery", cal_dataset="c4", update_dataset=None)) == "9c6c95568a0d0bcf"
    split = c(method="oats", model_update="lowrank_recovery", cal_dataset=SELF_GENERATED, update_dataset="c4")
    assert config_hash(split) not in {config_hash(recovery), config_hash(c(method="oats", model_update="lowrank_recovery", cal_dataset=SELF_GENERATED))}


def test_self_generated_update_text_brings_the_sampling_keys():
    split = c(method="oats", model_update="lowrank_recovery", cal_dataset="c4", update_dataset=SELF_GENERATED, cal_temperature=0.7)
    assert split.cal_temperature == 0.7 and split.cal_top_p == 1.0
    assert config_hash(split) != config_hash(c(method="oats", model_update="lowrank_recovery", cal_dataset="c4", update_dataset=SELF_GENERATED))
    with pytest.raises(ConfigError, match="cal_top_p"):
        c(method="oats", model_update="lowrank_recovery", cal_dataset="c4", update_dataset="pydoc", cal_top_p=0.9)


HEAD = "from ml_collections import ConfigDict\nB = dict(model='smollm2-135m', method='oats', cal_nsamples=4, cal_seqlen=32, eval_seqlen=32, eval_max_windows=1)\n"

BAD = {
    "no model update": (dict(update_dataset="c4"), "config key 'update_dataset': 'c4' gives a model update's text, and model_update is 'none'; select a model_update or remove it"),
    "an unknown source": (dict(model_update="lowrank_recovery", update_dataset="self-generated"), "config key 'update_dataset': got 'self-generated' (did you mean 'self_generated'?)"),
    "a mix": (dict(model_update="lowrank_recovery", update_dataset=["c4", "pydoc"]), "config key 'update_dataset': got list ['c4', 'pydoc']; expected str"),
    "images": (dict(model_update="lowrank_recovery", update_dataset="photos"), "config key 'update_dataset': got 'photos'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_update_dataset_fails_in_one_line_before_any_model_loads(case, tmp_path, capsys, no_model_loads):
    kw, message = BAD[case]
    err = config_error(tmp_path, capsys, HEAD + f"CONFIGS = [ConfigDict(dict(B, **{kw!r}))]\n")
    assert message in err, err


def test_a_model_that_cannot_generate_is_refused_naming_the_update_key(monkeypatch):
    from oats import preflight

    cfg = c(method="oats", cal_dataset="pydoc", model_update="lowrank_recovery", update_dataset=SELF_GENERATED, cal_seqlen=32)
    preflight.check_architecture(cfg)  # a causal LM can
    preflight_models_cannot_generate(monkeypatch)
    with pytest.raises(ConfigError, match="config key 'update_dataset': 'self_generated' samples calibration text"):
        preflight.check_architecture(cfg)


def _task(model_dir, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oats.tasks import TextTask
    from oats.weights import InMemoryWeights

    cfg = resolve(ConfigDict(dict(model=str(model_dir), method="oats", model_update="lowrank_recovery", cal_nsamples=3,
                                  cal_seqlen=16, cal_batch_size=3, seed=5, **kw)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return TextTask(cfg, InMemoryWeights(model), tok, torch.device("cpu")), tok


def test_the_update_text_comes_from_its_own_source(tiny_model_dir, cache):
    from data import calibration_windows

    task, tok = _task(tiny_model_dir, cal_dataset=SELF_GENERATED, update_dataset="pydoc")
    cal = task.calibration_inputs()
    upd = task.update_inputs()
    assert torch.equal(upd, calibration_windows(tok, "pydoc", 3, 16, "random_windows", 5))
    assert cal[:, 0].eq(tok.bos_token_id).all() and not torch.equal(cal, upd)
    record = task.calibration_record()
    assert record["windows"] == {SELF_GENERATED: 3} and record["update"] == {"dataset": "pydoc", "windows": {"pydoc": 3}}

    task, tok = _task(tiny_model_dir, cal_dataset="pydoc", update_dataset=SELF_GENERATED)
    cal, upd = task.calibration_inputs(), task.update_inputs()
    assert torch.equal(cal, calibration_windows(tok, "pydoc", 3, 16, "random_windows", 5))
    assert upd.shape == (3, 16) and upd[:, 0].eq(tok.bos_token_id).all()
    record = task.calibration_record()
    assert list(record) == ["update"] and record["update"]["windows"] == {SELF_GENERATED: 3}
    assert record["update"][SELF_GENERATED]["sha256"] == tokens_hash(upd)

    task, _ = _task(tiny_model_dir, cal_dataset="pydoc")
    assert task.update_inputs() is None and task.calibration_record() == {}


def test_an_experiment_distils_on_the_update_text(tiny_model_dir, cache, tmp_path, monkeypatch):
    """The dense targets are taken on the update's windows, the statistics on the calibration windows."""
    import oats.experiment
    import oats.model_update
    from oats.experiment import run_experiment

    seen = {}
    real_targets, real_capture = oats.model_update.dense_targets, oats.experiment.capture_inputs

    def targets(model, ids, *a, **kw):
        seen["targets"] = ids.clone()
        return real_targets(model, ids, *a, **kw)

    def capture(model, ids, *a, **kw):
        seen["calibration"] = ids.clone()
        return real_capture(model, ids, *a, **kw)

    monkeypatch.setattr(oats.model_update, "dense_targets", targets)
    monkeypatch.setattr(oats.experiment, "capture_inputs", capture)
    cfg = resolve(ConfigDict(dict(model=str(tiny_model_dir), method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=5,
                                  cal_dataset="pydoc", cal_nsamples=4, cal_seqlen=32, cal_batch_size=4, eval_datasets=["pydoc"],
                                  eval_seqlen=32, eval_max_windows=2, device="cpu", model_update="lowrank_recovery",
                                  recovery_epochs=1, recovery_topk=8, update_dataset=SELF_GENERATED)))
    rec = run_experiment(cfg, tmp_path / "x")
    assert rec["model_update"]["sparse_parts_unchanged"]
    fp = rec["calibration"]["update"][SELF_GENERATED]
    assert tokens_hash(seen["targets"]) == fp["sha256"] and fp["count"] == 4 and fp["length"] == 32
    assert not torch.equal(seen["targets"], seen["calibration"])
    assert set(rec["data"]) == {"cal:pydoc", "eval:pydoc"}  # self-generated text is no corpus

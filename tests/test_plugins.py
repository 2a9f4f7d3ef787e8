"""The plugin contract: a new method is one file plus one registry line, validated and hashed like
the built-ins; records written before plugins owned their keys are still done."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from oats import registry
from oats.config import ConfigError, config_hash, resolve, resolve_all
from oats.sweep import run_all, status_of

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_results"

TOY = '''
"""A toy method: keep every weight whose |w| is above toy_cut times the row's mean |w| (a single file)."""
import torch

from oats.interface import CompressedWeight, Method
from oats.keys import ConfigError, Key, positive

KEYS = {"toy_cut": Key(1.0, (float, int), "keep |w| above toy_cut x the row mean", positive),
        "toy_mode": Key("row", (str,), "only 'row' exists")}


def validate(cfg):
    if cfg["toy_mode"] != "row":
        raise ConfigError("toy_mode", f"got {cfg['toy_mode']!r}; allowed values: 'row'")


def compress_weight(weight, stats, budget, cfg=None):
    a = weight.abs()
    mask = a > cfg["toy_cut"] * a.mean(1, keepdim=True)
    return CompressedWeight(dense=weight * mask, mask=mask, info={"toy": True})


METHOD = Method("toy", compress_weight, stats="none", keys=KEYS, validate=validate, doc="toy")
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.METHODS, "toy", "toy_method")  # the one registry line
    registry.plugin.cache_clear()
    yield
    registry.plugin.cache_clear()
    sys.modules.pop("toy_method", None)


def test_a_new_method_is_one_file_and_one_registry_line(toy_method, tiny_model_dir, tmp_path):
    base = dict(model=str(tiny_model_dir), method="toy", cal_nsamples=2, cal_seqlen=32, eval_seqlen=32, eval_max_windows=2, name="toy")
    cfg = resolve(ConfigDict(base))
    assert cfg.toy_cut == 1.0 and "toy_cut" in cfg and "rank_ratio" not in cfg
    assert config_hash(resolve(ConfigDict({**base, "toy_cut": 0.5}))) != config_hash(cfg)  # its keys are hashed
    with pytest.raises(ConfigError, match="'toy_cut'.*> 0"):
        resolve(ConfigDict({**base, "toy_cut": -1.0}))
    with pytest.raises(ConfigError, match="'toy_mode'.*allowed values"):
        resolve(ConfigDict({**base, "toy_mode": "col"}))
    with pytest.raises(ConfigError, match="'toy_cut'.*belongs to method 'toy'"):
        resolve(ConfigDict({**base, "method": "wanda", "toy_cut": 2.0}))
    assert run_all([cfg], tmp_path / "out") == {"toy": "ok"}
    rec = json.loads((tmp_path / "out" / "toy" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["config"]["toy_cut"] == 1.0 and all(r["toy"] for r in rec["layers"])
    assert 0.3 < rec["achieved_sparsity"] < 0.8 and rec["metrics"]["ppl"]["pydoc"] > 0
    assert status_of(cfg, tmp_path / "out") == "done"


def test_results_written_before_the_redesign_are_still_done(tmp_path):
    """Records produced by the code before plugins owned their keys (git 5138dc6), committed as fixtures."""
    shutil.copytree(FIXTURES, tmp_path / "out")
    cfgs = resolve_all(runpy.run_path(str(FIXTURES / "configs.py"))["CONFIGS"])
    assert {c.name for c in cfgs} == {"dense", "wanda-50", "oats-50", "sparsegpt-24-optima", "owl-wanda-50"}
    for c in cfgs:
        rec = json.loads((tmp_path / "out" / c.name / "result.json").read_text())
        assert "hash_version" not in rec and rec["versions"]["git"] == "5138dc6"
        assert rec["config_hash"] != config_hash(c)  # the new hash differs, and yet:
        assert status_of(c, tmp_path / "out") == "done", c.name
    assert run_all(cfgs, tmp_path / "out") == {c.name: "skipped" for c in cfgs}
    changed = resolve(ConfigDict({**runpy.run_path(str(FIXTURES / "configs.py"))["CONFIGS"][2].to_dict(), "num_iters": 3}))
    assert status_of(changed, tmp_path / "out") == "stale"

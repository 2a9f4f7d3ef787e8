"""The experiment lists (OATS_configs.py, configs/*.py) load as ``main.py`` loads them, from any working
directory, with their shared protocols from ``configs.base``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTS = [ROOT / "OATS_configs.py", *sorted(p for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "base.py"))]


def test_every_list_loads_from_another_directory(tmp_path):
    # main.py's folder (the repository root) is sys.path[0] when it runs; nothing else is assumed
    code = ("import json, runpy, sys; sys.path[0] = sys.argv[1]; "
            "print(json.dumps({f: [c.name for c in runpy.run_path(f)['CONFIGS']] for f in sys.argv[2:]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *map(str, LISTS)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = json.loads(out.stdout)
    assert len(LISTS) >= 5 and set(names) == {str(f) for f in LISTS}
    for f, n in names.items():
        assert n and len(set(n)) == len(n), f


def test_an_experiment_shares_no_list_with_the_protocols():
    from configs import base

    exp = base.experiment(base.WIKITEXT, name="a")
    exp.eval_datasets.append("pydoc")
    assert base.WIKITEXT["eval_datasets"] == ["wikitext2"]
    assert base.experiment(base.PYDOC, name="b", seed=3).to_dict() == {**base.PYDOC, "name": "b", "seed": 3}


def test_calibration_rows_named_as_quality_rows_are_those_experiments(monkeypatch):
    """The calibration sweep reuses the quality table's names for its C4 rows; each must be the same
    experiment (config hash), and every row must resolve."""
    import runpy

    from oats.config import config_hash, resolve_all

    for var in ("OATS_BENCH_ROWS", "OATS_BENCH_ZS"):
        monkeypatch.delenv(var, raising=False)
    cal = {c.name: c for c in resolve_all(runpy.run_path(str(ROOT / "configs" / "smollm2_calibration.py"))["CONFIGS"])}
    quality = {c.name: c for c in resolve_all(runpy.run_path(str(ROOT / "configs" / "smollm2_quality.py"))["CONFIGS"])}
    shared = set(cal) & set(quality)
    assert shared == {f"{row}-s{s}" for row in ("sparsegpt-50", "oats-50-k0.3-recovery", "oats-50-k0.3-recovery-64k-e4")
                      for s in (1, 2, 3)}
    assert all(config_hash(cal[n]) == config_hash(quality[n]) for n in shared)
    # methods x sources x sizes x seeds, the 256k recovery rows at 1 epoch too, and the two split rows x 16k/64k x seeds
    assert len(cal) == 2 * 3 * 3 * 3 + 3 * 3 + 2 * 2 * 3
    e1 = cal["oats-50-k0.3-recovery-c4-256k-e1-s3"]
    assert (e1.cal_nsamples, e1.recovery_epochs, e1.seed) == (512, 1, 3)
    assert cal["oats-50-k0.3-recovery-sg-256k-e4-s1"].recovery_epochs == 4
    split = cal["oats-50-k0.3-recovery-sg-c4distill-16k-s2"]
    assert (split.cal_dataset, split.update_dataset, split.cal_nsamples, split.seed) == ("self_generated", "c4", 32, 2)
    split = cal["oats-50-k0.3-recovery-c4-sgdistill-64k-e4-s1"]
    assert (split.cal_dataset, split.update_dataset, split.cal_nsamples, split.recovery_epochs) == ("c4", "self_generated", 128, 4)

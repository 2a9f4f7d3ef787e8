"""bench/bench_quality.py builds its CONFIGS list (nothing is run): names, seeds, filters."""
from __future__ import annotations

import runpy
from collections import Counter
from pathlib import Path

from eval.aggregate import base_name

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"


def _configs(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(BENCH))["CONFIGS"]


def test_rows_names_and_seeds(monkeypatch):
    monkeypatch.delenv("OATS_BENCH_ROWS", raising=False)
    monkeypatch.delenv("OATS_BENCH_RECON", raising=False)
    cfgs = _configs(monkeypatch)
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names))
    assert {"dense", "oats-50-k0.3-s1", "gram_slr-70-k0.1-s3", "owl-sparsegpt-50-s2", "sparsegpt-optima-24-s1",
            "oats-optima-50-k0.3-recon-s1", "gram_slr-24-recon-s2"} <= set(names)
    per_row = Counter(base_name(n) for n in names if n != "dense")
    assert set(per_row.values()) == {3}  # every row at seeds 1, 2, 3
    by = {c.name: c for c in cfgs}
    c = by["oats-70-k0.2-s2"]
    assert (c.method, c.sparsity, c.sparsity_type, c.rank_ratio, c.seed) == ("oats", 0.7, "unstructured", 0.2, 2)
    assert (c.cal_dataset, c.cal_sampler, c.cal_nsamples, c.cal_seqlen, c.eval_datasets, c.eval_seqlen, c.eval_max_windows) == (
        "c4", "random_windows", 32, 512, ["wikitext2"], 512, 64)
    assert by["sparsegpt-optima-50-s1"].weight_update == "optima" and by["owl-sparsegpt-70-s1"].layerwise == "owl"
    assert by["gram_slr-50-k0.3-recon-s3"].block_update == "reconstruct"
    assert by["gram_slr-24-s1"].sparsity_type == "2:4" and not any(n.startswith("owl-sparsegpt-24") for n in names)


def test_row_filters(monkeypatch):
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="oats-50-*,dense", OATS_BENCH_RECON="wanda")
    names = [c.name for c in cfgs]
    assert names[0] == "dense" and all(n == "dense" or n.startswith("oats-50-") for n in names)
    assert len(names) == 1 + 3 * 4
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="*-recon-*", OATS_BENCH_RECON="wanda")
    assert sorted({base_name(c.name) for c in cfgs}) == ["wanda-24-recon", "wanda-50-recon", "wanda-70-recon"]

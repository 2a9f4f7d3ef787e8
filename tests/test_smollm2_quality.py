"""configs/smollm2_quality.py builds its CONFIGS list (nothing is run): names, seeds, filters; and
tools/report_quality.py groups its records by seed."""
from __future__ import annotations

import runpy
from collections import Counter
from pathlib import Path

from eval.aggregate import base_name

QUALITY = Path(__file__).resolve().parents[1] / "configs" / "smollm2_quality.py"


def _configs(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(QUALITY))["CONFIGS"]


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
    assert by["oats-50-k0.3-recovery-s2"].model_update == "lowrank_recovery" and "model_update" not in by["oats-50-k0.3-s2"]
    assert by["gram_slr-24-s1"].sparsity_type == "2:4" and not any(n.startswith("owl-sparsegpt-24") for n in names)


def test_row_filters(monkeypatch):
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="oats-50-*,dense", OATS_BENCH_RECON="wanda")
    names = [c.name for c in cfgs]
    assert names[0] == "dense" and all(n == "dense" or n.startswith("oats-50-") for n in names)
    # rank ratios 0, 0.1, 0.2, 0.3 and the 0.3 rows with low-rank recovery (3 and 8 epochs, 64k tokens at 3 and 4 epochs) and masked distillation
    assert len(names) == 1 + 3 * 9
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="*-recon-*", OATS_BENCH_RECON="wanda", OATS_BENCH_RECON_DM="")
    assert sorted({base_name(c.name) for c in cfgs}) == ["wanda-24-recon", "wanda-50-recon", "wanda-70-recon"]
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="*-recon-dm-*", OATS_BENCH_RECON="", OATS_BENCH_RECON_DM="sparsegpt")
    assert sorted({base_name(c.name) for c in cfgs}) == ["sparsegpt-24-recon-dm", "sparsegpt-50-recon-dm", "sparsegpt-70-recon-dm"]
    assert {c.recon_target for c in cfgs} == {"dense_model"}


def test_zero_shot_rows(monkeypatch):
    cfgs = _configs(monkeypatch, OATS_BENCH_ROWS="sparsegpt-50-s*", OATS_BENCH_ZS="sparsegpt-50-s1", OATS_BENCH_ZS_LIMIT="100")
    by = {c.name: c for c in cfgs}
    assert by["sparsegpt-50-s1"].zero_shot_limit == 100 and "boolq" in by["sparsegpt-50-s1"].zero_shot_tasks
    assert list(by["sparsegpt-50-s2"].get("zero_shot_tasks", [])) == []


def _record(name, seed, ppl, zs=None, **cfg):
    config = {"name": name, "seed": seed, "method": "sparsegpt", "sparsity": 0.5, "sparsity_type": "unstructured",
              "zero_shot_tasks": ["boolq"] if zs is not None else [], "zero_shot_limit": 100 if zs is not None else None, **cfg}
    metrics = {"ppl": {"wikitext2": ppl}, **({"zero_shot": {"boolq": zs, "mean": zs}} if zs is not None else {})}
    return {"name": name, "status": "ok", "config": config, "metrics": metrics, "achieved_sparsity": 0.5,
            "timings": {"compression": 10.0 * seed}, "compresses": True, "method_label": "SparseGPT"}


def test_report_groups_a_zero_shot_seed_with_its_other_seeds():
    from tools.report_quality import quality_markdown, quality_rows, zero_shot_markdown

    recs = [_record("sparsegpt-50-s1", 1, 60.0, zs=0.5), _record("sparsegpt-50-s2", 2, 62.0), _record("sparsegpt-50-s3", 3, 64.0),
            _record("sparsegpt-70-s1", 1, 300.0, sparsity=0.7)]
    rows = quality_rows(recs)
    assert [r["name"] for r in rows] == ["sparsegpt-50", "sparsegpt-70"]
    ppl = rows[0]["metrics"]["ppl.wikitext2"]
    assert ppl["n"] == 3 and abs(ppl["mean"] - 62.0) < 1e-12 and abs(ppl["std"] - 2.0) < 1e-12
    assert rows[0]["metrics"]["zero_shot.boolq"]["n"] == 1
    md = quality_markdown(rows)
    assert "62.00 ± 2.00 (n=3)" in md and "60.00, 62.00, 64.00" in md and "| 20 |" in md
    assert "| `sparsegpt-50` | 50.0 | 50.0 |" in zero_shot_markdown(rows)

"""eval.aggregate: seed groups, mean ± sample std, failed runs kept out, different configs kept apart."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from eval.aggregate import base_name, format_rows, group_by_seed, mean_std, record_metrics, summarize


def rec(name, seed, ppl, zs=None, status="ok", **cfg):
    config = {"name": name, "method": "oats", "sparsity": 0.5, "rank_ratio": 0.3, "seed": seed, **cfg}
    r = {"name": name, "status": status, "config": config}
    if status == "ok":
        r["metrics"] = {"ppl": {"wikitext2": ppl}, "zero_shot": zs or {}, "zero_shot_info": {"limit": 100, "approximate": ["x"]}}
        r["achieved_sparsity"] = 0.5
        r["timings"] = {"compress": 10.0 * seed, "total": 20.0}
    return r


def test_summarize_and_mean_std_known_values():
    s = summarize([58.0, 60.0, 62.0])
    assert s == {"mean": 60.0, "std": 2.0, "n": 3}  # sample std (ddof=1): population std would be 1.633
    assert mean_std([58.0, 60.0, 62.0]) == "60.00 ± 2.00 (n=3)"
    assert mean_std([1.0, 2.0], digits=3) == "1.500 ± 0.707 (n=2)"
    assert summarize([7.5]) == {"mean": 7.5, "std": None, "n": 1}
    assert mean_std([7.5]) == "7.50 (n=1)"
    assert "±" not in mean_std([7.5])
    assert summarize([]) == {"mean": None, "std": None, "n": 0} and mean_std([]) == "n/a"


def test_groups_by_seed_with_known_mean_and_std():
    records = [
        rec("oats-50-k0.3-s1", 1, 58.0, {"boolq": 0.60, "rte": 0.50}),
        rec("oats-50-k0.3-s2", 2, 60.0, {"boolq": 0.62, "rte": 0.54}),
        rec("oats-50-k0.3-s3", 3, 62.0, {"boolq": 0.64}),
    ]
    (row,) = group_by_seed(records)
    assert row["name"] == "oats-50-k0.3" and row["n"] == 3 and row["seeds"] == [1, 2, 3] and row["n_failed"] == 0
    assert "seed" not in row["config"] and "name" not in row["config"] and row["config"]["method"] == "oats"
    m = row["metrics"]
    assert m["ppl.wikitext2"]["mean"] == pytest.approx(60.0) and m["ppl.wikitext2"]["std"] == pytest.approx(2.0)
    assert m["zero_shot.boolq"]["mean"] == pytest.approx(0.62) and m["zero_shot.boolq"]["std"] == pytest.approx(0.02)
    assert m["zero_shot.rte"]["n"] == 2 and m["zero_shot.rte"]["std"] == pytest.approx(math.sqrt(0.0008))  # only where reported
    assert m["achieved_sparsity"]["std"] == pytest.approx(0.0)
    assert m["timings.compress"]["mean"] == pytest.approx(20.0) and m["timings.compress"]["std"] == pytest.approx(10.0)
    assert m["zero_shot_info.limit"]["n"] == 3  # numeric leaves of nested info; the list is skipped
    assert m["ppl.wikitext2"]["values"] == [58.0, 60.0, 62.0]


def test_single_seed_has_no_std_and_failed_records_are_excluded():
    records = [rec("wanda-50-s1", 1, 70.0, method="wanda"), rec("wanda-50-s2", 2, 1e9, status="failed", method="wanda")]
    (row,) = group_by_seed(records)
    assert row["n"] == 1 and row["n_failed"] == 1 and row["names"] == ["wanda-50-s1"]
    assert row["metrics"]["ppl.wikitext2"] == {"mean": 70.0, "std": None, "n": 1, "values": [70.0]}
    assert mean_std(row["metrics"]["ppl.wikitext2"]) == "70.00 (n=1)"
    only_failed = group_by_seed([rec("x-s1", 1, 0.0, status="failed")])
    assert only_failed[0]["n"] == 0 and only_failed[0]["metrics"] == {} and only_failed[0]["n_failed"] == 1


def test_different_non_seed_config_is_not_merged():
    records = [
        rec("oats-50-k0.3-s1", 1, 58.0),
        rec("oats-50-k0.2-s1", 1, 65.0, rank_ratio=0.2),
        rec("oats-50-k0.3-s2", 2, 60.0),
        rec("oats-50-k0.2-s2", 2, 67.0, rank_ratio=0.2),
        rec("oats-70-k0.3-s1", 1, 200.0, sparsity=0.7),
    ]
    rows = group_by_seed(records)
    assert [r["name"] for r in rows] == ["oats-50-k0.3", "oats-50-k0.2", "oats-70-k0.3"]  # first appearance
    assert [r["n"] for r in rows] == [2, 2, 1]
    assert rows[1]["metrics"]["ppl.wikitext2"]["mean"] == pytest.approx(66.0)
    # a nested config difference (a list) also separates
    a = rec("e-s1", 1, 1.0, eval_datasets=["wikitext2"])
    b = rec("e-s2", 2, 3.0, eval_datasets=["wikitext2", "c4"])
    assert len(group_by_seed([a, b])) == 2


def test_a_key_added_later_at_its_default_does_not_split_a_row():
    """A record written before recovery_patience existed lacks it; a later seed holds it at its default
    (hashed only away from it). Compared on the keys the hash covers they are one experiment; a patience
    set away from the default is another; compared on every key, as by default, the old record splits."""
    from ml_collections import ConfigDict

    from oats.config import experiment_keys, resolve

    def run(seed, ppl, **kw):
        config = resolve(ConfigDict({"model": "smollm2-135m", "method": "sparsegpt", "model_update": "masked_distill",
                                     "seed": seed, "name": f"d-s{seed}", **kw})).to_dict()
        return {"name": config["name"], "status": "ok", "config": config, "metrics": {"ppl": {"wikitext2": ppl}}}

    old = run(1, 10.0)
    del old["config"]["recovery_patience"]
    records = [old, run(2, 12.0), run(3, 14.0, recovery_patience=3)]
    rows = group_by_seed(records, canonical=experiment_keys)
    assert [(r["seeds"], r["metrics"]["ppl.wikitext2"]["mean"]) for r in rows] == [([1, 2], 11.0), ([3], 14.0)]
    assert len(group_by_seed(records)) == 3
    # a record of a method this code does not register is compared on every key, not refused
    foreign = {"name": "x-s1", "status": "ok", "config": {"method": "retired", "seed": 1}, "metrics": {"ppl": {"wikitext2": 1.0}}}
    assert len(group_by_seed(records + [foreign], canonical=experiment_keys)) == 3


def test_names_and_table():
    assert base_name("oats-50-k0.3-s12") == "oats-50-k0.3" and base_name("dense") == "dense"
    rows = group_by_seed([rec("a-s1", 1, 10.0), rec("a-s2", 2, 12.0)])
    table = format_rows(rows, ["ppl.wikitext2", "zero_shot.mean"])
    assert "| a | 11.00 ± 1.41 (n=2) | n/a |" in table
    assert record_metrics({"metrics": {"ppl": {"c4": 3}}, "achieved_sparsity": True}) == {"ppl.c4": 3.0}


def test_eval_aggregate_is_a_leaf_module():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "eval" / "aggregate.py").read_text())
    mods = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not mods & {"oats", "baselines", "updates", "torch"}

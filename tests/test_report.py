"""Report: known records in, known tables out (Markdown, CSV, LaTeX); plots written as PNG."""
from __future__ import annotations

import csv
import io

from eval import report as rp


def _rec(name, method, sparsity, ppl, zs=None, layers=None, **cfg):
    c = {"name": name, "model": "smollm2-135m", "method": method, "sparsity": sparsity, "sparsity_type": "unstructured",
         "layerwise": "uniform", "weight_update": "none", "eval_seqlen": 512, **cfg}
    m = {"ppl": {"wikitext2": ppl}}
    if zs is not None:
        m["zero_shot"] = zs
        m["zero_shot_info"] = {"limit": None, "approximate": [t for t in zs if t.endswith("_approx")], "fewshot": 0}
    return {"name": name, "status": "ok", "config": c, "metrics": m, "layers": layers or []}


LAYERS = [
    {"layer": f"model.layers.{b}.{n}", "block": b, "shape": [64, 64], "kept_params": 2048, "sparsity": s, "scaled_rel_error": 0.1 * (b + 1), "rank": r}
    for b in range(2) for n, s, r in (("q_proj", 0.5, 4), ("k_proj", 0.5, 6))
]
RECORDS = [
    _rec("wanda-50", "wanda", 0.5, 30.0, {"boolq": 0.6, "arc_easy": 0.5, "mean": 0.55}),
    _rec("dense", "dense", 0.5, 20.0, {"boolq": 0.7, "hellaswag_approx": 0.4, "arc_easy": 0.6, "mean": 0.5666666666666667}),
    _rec("oats-50", "oats", 0.5, 25.0, {"boolq": 0.65, "arc_easy": 0.55, "mean": 0.6}, layers=LAYERS),
    _rec("wanda-24", "wanda", 0.5, 40.0, None, sparsity_type="2:4"),
    _rec("owl-wanda-60", "wanda", 0.6, 50.0, None, layerwise="owl"),
    {"name": "broken", "status": "failed", "config": {"name": "broken", "method": "oats"}, "error": "boom"},
]


def test_table_layout_and_values():
    header, rows = rp.build_table(RECORDS)
    assert header == ["model", "method", "compression", "wikitext2 ppl @512", "boolq", "hellaswag (approx)", "arc_easy", "mean", "notes"]
    # dense first, then methods alphabetically, then compression; failed records left out
    assert [r[:3] for r in rows] == [
        ["smollm2-135m", "dense", "0"],
        ["smollm2-135m", "OWL + wanda", "0.6"],
        ["smollm2-135m", "oats", "0.5"],
        ["smollm2-135m", "wanda", "0.5"],
        ["smollm2-135m", "wanda", "0.5 (2:4)"],
    ]
    assert rows[0][3:8] == [20.0, 70.0, 40.0, 60.0, 100 * 0.5666666666666667]
    assert rows[0][8] == "approx. data: hellaswag_approx"
    assert rows[3][3:8] == [30.0, 60.0, None, 50.0, 100 * 0.55]
    assert rows[4][3:8] == [40.0, None, None, None, None]


def test_markdown_csv_latex_exact():
    header, rows = rp.build_table(RECORDS[:2])
    assert rp.to_markdown(header, rows) == (
        "| model | method | compression | wikitext2 ppl @512 | boolq | hellaswag (approx) | arc_easy | mean | notes |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---|\n"
        "| smollm2-135m | dense | 0 | 20.00 | 70.00 | 40.00 | 60.00 | 56.67 | approx. data: hellaswag_approx |\n"
        "| smollm2-135m | wanda | 0.5 | 30.00 | 60.00 | – | 50.00 | 55.00 |  |\n"
    )
    parsed = list(csv.reader(io.StringIO(rp.to_csv(header, rows))))
    assert parsed[0] == header
    assert parsed[2] == ["smollm2-135m", "wanda", "0.5", "30.0", "60.0", "", "50.0", repr(100 * 0.55), ""]
    tex = rp.to_latex(header, rows)
    assert tex.splitlines()[0] == r"\begin{tabular}{lllrrrrrl}"
    assert r"hellaswag (approx) & arc\_easy & mean & notes \\" in tex
    assert r"smollm2-135m & wanda & 0.5 & 30.00 & 60.00 & -- & 50.00 & 55.00 &  \\" in tex
    assert r"approx. data: hellaswag\_approx" in tex
    assert tex.rstrip().endswith(r"\end{tabular}")


def test_latex_escape():
    assert rp.latex_escape("a_b & 50% #1 {x}") == r"a\_b \& 50\% \#1 \{x\}"


def test_word_ppl_and_mmlu_columns():
    r = _rec("dense", "dense", 0.5, 20.0, {"boolq": 0.7, "mean": 0.7, "mmlu": 0.3})
    r["metrics"]["word_ppl"] = {"wikitext": {"word_perplexity": 33.5, "max_length": 512}}
    r["metrics"]["mmlu"] = {"acc": 0.3, "fewshot": 5, "subjects": {"anatomy": {}, "virology": {}}}
    header, rows = rp.build_table([r])
    assert header[3:] == ["wikitext2 ppl @512", "wikitext word ppl @512 (lm_eval)", "boolq", "mean", "mmlu", "notes"]
    assert rows[0][3:8] == [20.0, 33.5, 70.0, 70.0, 30.0]
    assert "mmlu 5-shot, 2 subjects" in rows[0][8]


def test_report_writes_tables_and_pngs(tmp_path):
    from oats.records import write_record

    for r in RECORDS:
        write_record(tmp_path / r["name"], r)
    from oats.records import report

    written = report(tmp_path)
    out = tmp_path / "report"
    for kind in ("md", "csv", "tex"):
        assert written[kind] == out / f"results.{kind}" and written[kind].stat().st_size > 0
    for key, name in (("ppl_plot", "ppl_vs_compression.png"), ("accuracy_plot", "zero_shot_accuracy.png"), ("layers_oats-50", "layers_oats-50.png")):
        assert written[key] == out / name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "layers_dense.png").exists()  # no layers recorded for dense


def test_main_report_flag(tmp_path, capsys):
    import main
    from oats.records import write_record

    write_record(tmp_path / "dense", RECORDS[1])
    assert main.main(["--report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "results.md").read_text().startswith("| model | method |")


def test_records_differing_only_by_seed_become_mean_and_std(tmp_path):
    from ml_collections import ConfigDict

    from oats.config import over_seeds, resolve_all

    cfgs = resolve_all(over_seeds([ConfigDict(dict(model="m", method="wanda", name="w", eval_datasets=["wikitext2"]))], seeds=(0, 1, 2)))
    assert [c.name for c in cfgs] == ["w-s0", "w-s1", "w-s2"] and [c.seed for c in cfgs] == [0, 1, 2]
    recs = [{"name": c.name, "status": "ok", "config": c.to_dict(), "achieved_sparsity": 0.5,
             "metrics": {"ppl": {"wikitext2": v}}} for c, v in zip(cfgs, (10.0, 12.0, 14.0))]
    recs.append({"name": "other", "status": "ok", "config": {**cfgs[0].to_dict(), "sparsity": 0.7, "name": "other"},
                 "achieved_sparsity": 0.7, "metrics": {"ppl": {"wikitext2": 50.0}}})
    table = rp.seed_table(recs)
    row = next(line for line in table.splitlines() if line.startswith("| w "))
    assert "12.00 ± 2.00 (n=3)" in row  # mean 12, sample std 2
    assert "50.00 (n=1)" in next(line for line in table.splitlines() if line.startswith("| other"))
    assert rp.plot_ppl_vs_compression(recs, tmp_path / "p.png").stat().st_size > 1000
    written = rp.write_report(recs, tmp_path / "rep")
    assert written["seeds"].read_text() == table

"""The first run: the shipped default list fits about 3 minutes on a 2-core CPU, and the console says
what happened (results table at the end, one line on Ctrl-C, an empty --report is an error)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

import main
from oats.config import resolve_all, selected_plugins

ROOT = Path(__file__).resolve().parents[1]
# Measured on this 2-core CPU (README): SmolLM2-135M forward at about 340 tokens/s on 2 threads.
TOKENS_PER_S = 340.0
FIRST_RUN_S = 180.0
CONVERSION_S = 40.0  # GGUF -> safetensors, once per machine


def estimated_seconds(cfg) -> float:
    """Forward tokens an experiment costs, as seconds at TOKENS_PER_S: calibration windows through every
    block twice (statistics, then the next block's inputs; OWL once more), plus the evaluation windows;
    compression work per matrix is left to the measured README number, not estimated here."""
    plugins = selected_plugins(cfg)
    tokens = cfg.eval_max_windows * cfg.eval_seqlen * len(cfg.eval_datasets)
    if plugins["method"].compresses:
        tokens += cfg.cal_nsamples * cfg.cal_seqlen * (2 + ("layerwise" in plugins))
    return tokens / TOKENS_PER_S


def test_default_list_validates_and_its_token_budget_fits_three_minutes():
    cfgs = resolve_all(runpy.run_path(str(ROOT / "OATS_configs.py"))["CONFIGS"])
    methods = {c.method for c in cfgs}
    assert {"dense", "wanda", "sparsegpt", "oats"} <= methods and all(c.sparsity == 0.5 for c in cfgs if c.method != "dense")
    assert all(c.model == "smollm2-135m" and c.cal_dataset == "pydoc" and c.eval_datasets == ["pydoc"] for c in cfgs)  # offline
    budget = sum(estimated_seconds(c) for c in cfgs)
    assert budget + CONVERSION_S < 0.75 * FIRST_RUN_S, budget  # the rest of the 3 minutes is the methods' own work


def test_default_out_follows_the_config_file(tmp_path, monkeypatch):
    assert main.default_out("OATS_configs.py") == Path("results/OATS_configs")
    assert main.default_out("configs/smollm2_wikitext.py") == Path("results/smollm2_wikitext")


def _config(tmp_path, model_dir, names=("a", "b")) -> Path:
    f = tmp_path / "cfg.py"
    entries = ", ".join(f"ConfigDict(dict(model={str(model_dir)!r}, method='wanda', name={n!r}, cal_nsamples=2, cal_seqlen=32, "
                        f"eval_seqlen=32, eval_max_windows=2, device='cpu'))" for n in names)
    f.write_text(f"from ml_collections import ConfigDict\nCONFIGS = [{entries}]\n")
    return f


def test_end_of_run_prints_the_results_table(tmp_path, tiny_model_dir, capsys):
    f = _config(tmp_path, tiny_model_dir)
    assert main.main(["--config", str(f), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| experiment"))
    for col in ("method", "achieved", "ppl pydoc (seqlen)", "cal tokens", "eval tokens", "compress s", "total s"):
        assert col in header
    rows = [line for line in printed.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2 and "2 × 32" in rows[0] and "| 64 |" in rows[0]  # 2 windows of 32 calibration, 2 x 32 evaluated


def test_interrupted_run_says_what_is_done_and_how_to_resume(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import oats.experiment

    f = _config(tmp_path, tiny_model_dir)
    real = oats.experiment.run_experiment

    def second_is_interrupted(cfg, exp_dir):
        if cfg.name == "b":
            raise KeyboardInterrupt
        return real(cfg, exp_dir)

    monkeypatch.setattr(oats.experiment, "run_experiment", second_is_interrupted)
    argv = ["--config", str(f), "--out", str(tmp_path / "out")]
    assert main.main(argv) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted: 1 of 2 experiments done") and "python main.py --config" in lines[-1]
    assert "Traceback" not in err


def test_report_on_an_empty_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main.main(["--report", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no result records" in err
    assert not (tmp_path / "empty" / "report").exists()


def test_dense_is_logged_as_no_compression(tmp_path, tiny_model_dir, caplog):
    from ml_collections import ConfigDict

    from oats.config import resolve
    from oats.sweep import describe

    assert describe(resolve(ConfigDict(dict(model="m")))) == "dense, no compression"
    assert describe(resolve(ConfigDict(dict(model="m", method="wanda", sparsity=0.5)))) == "wanda, sparsity 0.5, unstructured"

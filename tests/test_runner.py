"""The sweep runner: results on disk, resume-skip by config hash, failures recorded without stopping."""
import json

import pytest
from ml_collections import ConfigDict

import main
from oats.config import resolve_all
from oats.sweep import run_all, status_of


def tiny(tiny_model_dir, **kw):
    base = dict(model=str(tiny_model_dir), cal_nsamples=2, cal_seqlen=32, cal_batch_size=2,
                eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=2)
    return ConfigDict({**base, **kw})


def test_results_resume_and_failure(tiny_model_dir, tmp_path):
    cfgs = resolve_all([
        tiny(tiny_model_dir, name="dense", method="dense"),
        tiny(tiny_model_dir, name="broken", model=str(tmp_path / "no-such-model")),
        tiny(tiny_model_dir, name="mag", method="magnitude", sparsity=0.5),
    ])
    out = tmp_path / "res"
    outcome = run_all(cfgs, out)
    assert outcome == {"dense": "ok", "broken": "failed", "mag": "ok"}
    rec = json.loads((out / "mag" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["config"]["sparsity"] == 0.5
    assert set(rec["timings"]) >= {"load", "calibration", "compression", "evaluation", "total"}
    assert rec["metrics"]["ppl"]["pydoc"] > 1 and rec["achieved_sparsity"] == pytest.approx(0.5)
    assert all(layer["sparsity"] == pytest.approx(0.5) for layer in rec["layers"])
    assert {"torch", "transformers", "python"} <= set(rec["versions"]) and rec["peak_memory_mb"]["cpu_rss"] > 0
    failed = json.loads((out / "broken" / "result.json").read_text())
    assert failed["status"] == "failed" and "config key 'model'" in failed["error"] and "Traceback" in failed["traceback"]
    assert (out / "summary.md").read_text().count("| ok |") == 2

    # Rerun: done experiments are skipped, the failed one is tried again.
    mtime = (out / "mag" / "result.json").stat().st_mtime_ns
    assert run_all(cfgs, out) == {"dense": "skipped", "broken": "failed", "mag": "skipped"}
    assert (out / "mag" / "result.json").stat().st_mtime_ns == mtime
    # A changed config is no longer "done".
    changed = resolve_all([tiny(tiny_model_dir, name="mag", method="magnitude", sparsity=0.6)])[0]
    assert status_of(changed, out) == "stale"
    assert status_of(cfgs[0], out) == "done" and status_of(cfgs[1], out) == "failed"


def test_cli_list_only_index(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "exp.py"
    f.write_text(
        "from ml_collections import ConfigDict\n"
        f"B=dict(model={str(tiny_model_dir)!r}, eval_seqlen=64, eval_max_windows=1, cal_nsamples=2, cal_seqlen=32)\n"
        "CONFIGS=[ConfigDict(dict(B, name='a')), ConfigDict(dict(B, name='b', method='magnitude'))]\n"
    )
    out = tmp_path / "o"
    assert main.main(["--config", str(f), "--out", str(out), "--only", "b"]) == 0
    assert (out / "b" / "result.json").exists() and not (out / "a").exists()
    assert main.main(["--config", str(f), "--out", str(out), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "pending   a" in listing and "done      b" in listing
    assert main.main(["--config", str(f), "--out", str(out), "--index", "5"]) == 2


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_magnitude_exact_on_smollm2(fresh_smollm2, sparsity_type):
    """Magnitude 50% through the real pipeline: exactly half of every layer is zero (unstructured), or
    exactly 2 nonzeros in every 4 consecutive inputs (2:4). The GGUF weights hold a few exact zeros
    already; they are nudged off zero first so that counting zeros counts the mask."""
    import torch

    from oats.compressor import compress_model
    from oats.config import resolve
    from oats.architectures import get_blocks, linear_layers
    from oats.pipeline import capture_inputs

    model, tok = fresh_smollm2
    layers = [lin for block in get_blocks(model) for lin in linear_layers(block).values()]
    for lin in layers:
        lin.weight.data[lin.weight.data == 0] = 1e-8
    cfg = resolve(ConfigDict(dict(model="smollm2-135m", method="magnitude", sparsity_type=sparsity_type)))
    ids = torch.randint(100, 1000, (1, 8))
    records = compress_model(model, capture_inputs(model, ids, torch.device("cpu"), 1), cfg, torch.device("cpu"), [0.5] * 30)
    assert len(records) == 30 * 7 and all(r["sparsity"] == 0.5 for r in records)
    for lin in layers:
        w = lin.weight
        if sparsity_type == "2:4":
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert int((w == 0).sum()) == w.numel() // 2

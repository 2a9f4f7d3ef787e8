"""`python main.py --export NAME --to DIR --format ...` and `export_format` at the end of a run; compress
mode records the forward it chose, and that forward gives the dense-merged logits."""
from __future__ import annotations

import json

import pytest
import torch

import main


def _config(tmp_path, model_dir, **kw) -> str:
    over = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    f = tmp_path / "cfg.py"
    f.write_text("from ml_collections import ConfigDict\n"
                 f"CONFIGS = [ConfigDict(dict(model={str(model_dir)!r}, method='oats', num_iters=2, name='o', cal_nsamples=2, cal_seqlen=32, "
                 f"eval_seqlen=32, eval_max_windows=2, device='cpu', save_model=True, {over}))]\n")
    return str(f)


def test_export_at_the_end_of_a_run_and_by_name(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main.main(["--config", _config(tmp_path, tiny_model_dir, compress=True, export_format="peft"), "--out", str(out)]) == 0
    rec = json.loads((out / "o" / "result.json").read_text())
    assert rec["forward"]["summary"] and sum(rec["forward"]["calls"].values()) > 0  # compress mode says which forward ran
    assert (out / "o" / "export" / "adapter" / "adapter_config.json").is_file()
    assert main.main(["--config", _config(tmp_path, tiny_model_dir, compress=True, export_format="peft"), "--out", str(out),
                      "--export", "o", "--to", str(tmp_path / "bm"), "--format", "bitmask"]) == 0
    from transformers import AutoModelForCausalLM

    from factored.module import load_compressed

    ours = load_compressed(out / "o" / "model")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "bm", trust_remote_code=True)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)


def test_export_without_a_saved_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "out" / "x").mkdir(parents=True)
    assert main.main(["--out", str(tmp_path / "out"), "--export", "x"]) == 2
    assert "has no saved model" in capsys.readouterr().err


def test_export_format_needs_save_model(tmp_path, tiny_model_dir, capsys):
    f = _config(tmp_path, tiny_model_dir, export_format="dense").replace("save_model=True, ", "save_model=False, ")
    (tmp_path / "c2.py").write_text(open(f).read().replace("save_model=True", "save_model=False"))
    assert main.main(["--config", str(tmp_path / "c2.py"), "--out", str(tmp_path / "out")]) == 2
    assert "'export_format'" in capsys.readouterr().err

"""The memory plan (``python main.py --plan``): parts counted from the model's config alone, the layers
that share an input found on meta tensors, and predicted peaks against measured ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ml_collections import ConfigDict

import main
from oats.config import resolve
from oats.plan import FLOOR_BYTES, plan_experiment, remedies, shapes_of

ROOT = Path(__file__).resolve().parents[1]


def _llama_dir(tmp_path: Path, hidden=64, inter=160, layers=3, vocab=256, tie=True, tokenizer=None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie)
    path = tmp_path / f"llama-{hidden}-{layers}"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def test_shapes_from_the_config_alone_and_the_shared_inputs(tmp_path):
    d = _llama_dir(tmp_path)
    s = shapes_of(str(d))
    assert [[lin.name for lin in g] for g in s.inputs] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                            ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    kv = 2 * 16  # 2 kv heads of head_dim 16
    block = 64 * 64 * 2 + 64 * kv * 2 + 3 * 64 * 160 + 2 * 64  # q, o; k, v; gate, up, down; two norms
    assert s.block_params == block and s.head_params == 256 * 64 + 64  # tied embeddings once, final norm
    assert s.n_blocks == 3 and s.hidden == 64 and s.intermediate == 160


def test_parts_are_counted_exactly(tmp_path):
    d = str(_llama_dir(tmp_path))
    s = shapes_of(d)
    base = dict(model=d, cal_nsamples=6, cal_seqlen=32, cal_batch_size=2, eval_seqlen=32, eval_max_windows=2, device="cpu")
    dense = plan_experiment(resolve(ConfigDict({**base, "method": "dense"})))
    assert dense.parts["weights"] == (3 * s.block_params + s.head_params) * 4 and "statistics" not in dense.parts
    gpt = plan_experiment(resolve(ConfigDict({**base, "method": "sparsegpt", "stats_dtype": "float64"})))
    assert gpt.parts["statistics"] == (64 * 64 + 64 * 64 + 64 * 64 + 160 * 160) * 8  # one Gram per distinct input
    assert gpt.parts["activations"] == 2 * 6 * 32 * 64 * 4
    wanda = plan_experiment(resolve(ConfigDict({**base, "method": "wanda"})))
    assert wanda.parts["statistics"] == (64 + 64 + 64 + 160) * 4
    lazy = plan_experiment(resolve(ConfigDict({**base, "method": "wanda", "lazy_load": True})))
    assert lazy.parts["weights"] == (s.block_params + s.head_params) * 4 and lazy.cpu_peak < wanda.cpu_peak
    half = plan_experiment(resolve(ConfigDict({**base, "method": "wanda", "dtype": "bfloat16"})))
    assert half.parts["weights"] * 2 == wanda.parts["weights"]


def test_remedies_name_the_keys_that_make_it_fit(tmp_path):
    d = str(_llama_dir(tmp_path, hidden=128, inter=320, layers=6, vocab=4096))
    cfg = resolve(ConfigDict(dict(model=d, method="wanda", device="cpu", cal_nsamples=4, cal_seqlen=32)))
    p = plan_experiment(cfg)
    limit = p.cpu_peak - p.parts["weights"] // 2  # the whole model does not fit, one block does
    assert any(r.startswith("lazy_load: True") for r in remedies(cfg, limit))
    assert remedies(cfg, FLOOR_BYTES // 2) == []


def test_plan_cli_prints_every_experiment_and_loads_nothing(tmp_path, monkeypatch, capsys):
    import oats.models

    def boom(*a, **k):
        raise AssertionError("--plan loaded a model")

    monkeypatch.setattr(oats.models, "load_model", boom)
    d = _llama_dir(tmp_path)
    f = tmp_path / "cfg.py"
    f.write_text("from ml_collections import ConfigDict\n"
                 f"CONFIGS = [ConfigDict(dict(model={str(d)!r}, method=m, name=m, device='cpu')) for m in ('dense', 'wanda', 'sparsegpt')]\n")
    assert main.main(["--config", str(f), "--plan", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert all(f"| {m} | cpu |" in out for m in ("dense", "wanda", "sparsegpt")) and "this machine" in out
    assert not (tmp_path / "out" / "dense").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_predicted_peak_is_within_a_quarter_of_the_measured_one(tmp_path, method, smollm2):
    """A random Llama-shaped model of about 300 MB (SmolLM2's tokenizer), compressed and evaluated in a fresh process."""
    tok = smollm2[1]
    d = _llama_dir(tmp_path, hidden=512, inter=1536, layers=8, vocab=len(tok), tie=False, tokenizer=tok)
    f = tmp_path / "cfg.py"
    exp = dict(model=str(d), method=method, name=method, device="cpu", cal_dataset="pydoc", eval_datasets=["pydoc"],
               cal_nsamples=8, cal_seqlen=128, cal_batch_size=4, eval_seqlen=128, eval_max_windows=2, threads=2)
    f.write_text(f"from ml_collections import ConfigDict\nCONFIGS = [ConfigDict({exp!r})]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(f), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads((tmp_path / "out" / method / "result.json").read_text())["peak_memory_mb"]["cpu_rss"] * 2**20
    predicted = plan_experiment(resolve(ConfigDict(exp))).cpu_peak
    assert abs(predicted - measured) <= 0.25 * measured, (predicted / 2**20, measured / 2**20)


@pytest.mark.parametrize("model, params, hidden, inter", [("llama-3-8b", 8_030_261_248, 4096, 14336),
                                                          ("llama-3-70b", 70_553_706_496, 8192, 28672),
                                                          ("phi-3-medium", 13_960_238_080, 5120, 17920)])
def test_big_models_are_planned_from_their_configs(model, params, hidden, inter):
    """The published parameter counts, and the statistics and activations by the formula (bfloat16 weights
    and activations, float32 Gram matrices: one per distinct input, three hidden-wide and one MLP-wide)."""
    cfg = resolve(ConfigDict(dict(model=str(ROOT / "configs" / "shapes" / model), method="sparsegpt", dtype="bfloat16", device="cpu",
                                  cal_nsamples=128, cal_seqlen=2048)))
    p = plan_experiment(cfg)
    assert p.parts["weights"] == 2 * params
    assert p.parts["statistics"] == (3 * hidden * hidden + inter * inter) * 4
    assert p.parts["activations"] == 2 * 128 * 2048 * hidden * 2
    s = shapes_of(cfg.model)
    lazy = plan_experiment(resolve(ConfigDict({**cfg.to_dict(), "lazy_load": True})))
    assert lazy.parts["weights"] == 2 * (s.head_params + s.block_params) and lazy.cpu_peak < p.cpu_peak - p.parts["weights"] / 2


def test_a_run_that_cannot_fit_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import oats.models
    import oats.plan

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(oats.models, "load_model", boom)
    d = _llama_dir(tmp_path, hidden=256, inter=640, layers=12, vocab=4096)
    cfg = resolve(ConfigDict(dict(model=str(d), method="wanda", device="cpu", cal_nsamples=4, cal_seqlen=32, eval_seqlen=32,
                                  eval_max_windows=2, name="w")))
    p = plan_experiment(cfg)
    monkeypatch.setattr(oats.plan, "machine_memory", lambda: p.cpu_peak - p.parts["weights"] // 2)
    f = tmp_path / "cfg.py"
    f.write_text(f"from ml_collections import ConfigDict\nCONFIGS = [ConfigDict(dict(model={str(d)!r}, method='wanda', device='cpu', "
                 "cal_nsamples=4, cal_seqlen=32, eval_seqlen=32, eval_max_windows=2, name='w'))]\n")
    assert main.main(["--config", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config key 'lazy_load'" in err and "it fits with lazy_load: True" in err


def test_a_child_process_reports_its_own_peak_not_its_parents():
    """Linux carries ru_maxrss across fork and exec; the record's peak is the program's own (VmHWM)."""
    held = torch.ones(100_000_000, dtype=torch.float32)  # 400 MB in this process
    code = "from oats.experiment import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert float(out) < held.numel() * 4 / 2**20, out


def test_a_placed_lazy_evaluation_holds_what_max_memory_gives_the_cpu(tmp_path):
    d = str(_llama_dir(tmp_path, hidden=128, inter=320, layers=6, vocab=4096))
    s = shapes_of(d)
    base = dict(model=d, method="wanda", device="cpu", cal_nsamples=4, cal_seqlen=32, eval_seqlen=32, eval_max_windows=2, lazy_load=True)
    whole = (6 * s.block_params + s.head_params) * 4
    cfg = resolve(ConfigDict({**base, "device_map": "auto", "max_memory": {"cpu": "1MiB"}}))
    placed = plan_experiment(cfg)
    from accelerate.utils import compute_module_sizes

    from oats.placement import device_map_for
    from oats.plan import weightless_model

    model = weightless_model(d, "float32")
    sizes = compute_module_sizes(model, dtype=torch.float32)
    on_cpu = sum(int(sizes[m]) for m, where in device_map_for(model, cfg).items() if where == "cpu")  # accelerate's map
    assert 0 <= on_cpu <= 2**20
    assert placed.parts["weights_lm_eval"] == on_cpu + s.block_params * 4 < whole
    unlimited = plan_experiment(resolve(ConfigDict({**base, "device_map": "auto"})))
    assert unlimited.parts["weights_lm_eval"] == whole
    zero_shot = plan_experiment(resolve(ConfigDict({**base, "eval_datasets": [], "zero_shot_tasks": ["boolq"]})))
    assert zero_shot.parts["weights_lm_eval"] == (s.head_params + 2 * s.block_params) * 4


def test_self_generated_calibration_is_planned_on_the_whole_model(tmp_path):
    d = str(_llama_dir(tmp_path, hidden=128, inter=320, layers=6, vocab=4096))
    s = shapes_of(d)
    base = dict(model=d, method="wanda", cal_nsamples=4, cal_seqlen=32, cal_batch_size=2, eval_seqlen=32, eval_max_windows=2)
    gen = plan_experiment(resolve(ConfigDict({**base, "device": "cuda", "cal_dataset": "self_generated"})))
    kv = 2 * 32 * 6 * 2 * s.kv_heads * s.head_dim * 4
    assert gen.parts["generation"] == kv + 2 * 2 * 4096 * 4 + 2 * 32 * 320 * 4
    assert gen.device_peak >= (6 * s.block_params + s.head_params) * 4 + gen.parts["generation"]
    cfg = resolve(ConfigDict({**base, "device": "cpu", "cal_dataset": "self_generated"}))
    assert "generation" not in plan_experiment(resolve(ConfigDict({**base, "device": "cpu"}))).parts
    assert not any(r.startswith("lazy_load") for r in remedies(cfg, FLOOR_BYTES))  # refused with self_generated

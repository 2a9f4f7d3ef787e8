"""Statistics and activations on another device than the block (``stats_device``), the plan's count of
every GPU (a statistics GPU, the GPUs of a device map), the preflight's GPU checks, and a SLURM task that
uses its GPUs. On this CPU-only machine the device hop itself runs CPU to CPU; the GPU test skips."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from ml_collections import ConfigDict

from oats.config import resolve
from oats.keys import ConfigError
from oats.plan import plan_experiment, remedies, shapes_of
from tests.test_plan import _llama_dir

CPU = torch.device("cpu")


def _cfg(d, **kw):
    base = dict(model=str(d), method="sparsegpt", cal_nsamples=6, cal_seqlen=32, cal_batch_size=2, eval_seqlen=32,
                eval_max_windows=2, device="cuda", stats_dtype="float64")
    return resolve(ConfigDict({**base, **kw}))


def test_stats_device_is_validated_and_not_hashed(tmp_path):
    from oats.config import config_hash

    d = _llama_dir(tmp_path)
    with pytest.raises(ConfigError, match="stats_device.*'cpu', 'cuda', 'cuda:N'"):
        _cfg(d, stats_device="gpu1")
    assert config_hash(_cfg(d, stats_device="cuda:1")) == config_hash(_cfg(d))


def test_plan_moves_activations_and_statistics_to_the_stats_device(tmp_path):
    d = _llama_dir(tmp_path)
    s = shapes_of(str(d))
    base = plan_experiment(_cfg(d))
    on_cpu = plan_experiment(_cfg(d, stats_device="cpu"))
    apart = base.parts["activations"] + base.parts["statistics"]
    largest = 160 * 160 * 8  # down_proj's float64 Gram, served on the GPU for its solve
    assert base.parts["statistics"] == (3 * 64 * 64 + 160 * 160) * 8 and s.n_blocks == 3
    block = s.block_params * 4
    comp = sum(base.parts.get(k, 0) for k in ("activations", "block_forward", "statistics", "decomposition", "block_update"))
    evaluation = (3 * s.block_params + s.head_params) * 4 + base.parts["evaluation"]
    assert base.device_peak == max(block + comp, evaluation)
    assert on_cpu.device_peak == max(block + comp - apart + largest, evaluation)
    assert on_cpu.cpu_peak == base.cpu_peak + apart
    second = plan_experiment(_cfg(d, stats_device="cuda:1"))
    assert second.other_gpus == {"cuda:1": apart} and second.cpu_peak == base.cpu_peak
    assert second.device_peak == on_cpu.device_peak


def test_gpu_remedies_name_stats_device(tmp_path):
    d = _llama_dir(tmp_path, hidden=128, inter=320, layers=2, vocab=512)
    cfg = _cfg(d, lazy_load=True, cal_nsamples=64, cal_seqlen=64)
    p = plan_experiment(cfg)
    limit = p.device_peak - p.parts["activations"] // 2
    assert any(r.startswith("stats_device: 'cpu'") for r in remedies(cfg, limit, gpu=True))


def test_plan_splits_a_placed_evaluation_over_the_gpus(tmp_path):
    from accelerate.utils import compute_module_sizes

    from oats.placement import device_map_for
    from oats.plan import weightless_model

    d = _llama_dir(tmp_path, layers=4)
    s = shapes_of(str(d))
    block = s.block_params * 4
    cfg = _cfg(d, method="wanda", device_map="sequential",
               max_memory={"cuda:0": 2 * block + s.head_params * 4, "cuda:1": 10 * block, "cpu": "1GiB"})
    p = plan_experiment(cfg)
    model = weightless_model(str(d), "float32")
    sizes = compute_module_sizes(model, dtype=torch.float32)
    dm = device_map_for(model, cfg)
    per = {dev: sum(int(sizes[m]) for m, where in dm.items() if where == dev) for dev in set(dm.values())}
    whole = (4 * s.block_params + s.head_params) * 4
    assert set(per) == {"cuda:0", "cuda:1"} and whole <= per["cuda:0"] + per["cuda:1"] <= whole + 4096  # + rotary buffers
    assert per["cuda:1"] >= 2 * block  # the blocks that did not fit on cuda:0
    assert p.other_gpus == {"cuda:1": per["cuda:1"]}
    comp = sum(p.parts.get(k, 0) for k in ("activations", "block_forward", "statistics", "decomposition", "block_update"))
    assert p.device_peak == max(block + comp, per["cuda:0"] + p.parts["evaluation"] + block)


def _fake_gpus(monkeypatch, n: int, total: int, first: int | None = None) -> None:
    """``n`` GPUs of ``total`` bytes (the first of ``first`` bytes when given)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=first if i == 0 and first is not None else total))


def test_preflight_names_the_key_for_each_gpu_that_is_too_small(tmp_path, monkeypatch):
    from oats.preflight import check_memory, check_placement

    d = _llama_dir(tmp_path, hidden=128, inter=320, layers=2, vocab=512)
    cfg = _cfg(d, lazy_load=True, cal_nsamples=64, cal_seqlen=64)
    p = plan_experiment(cfg)
    _fake_gpus(monkeypatch, 1, p.device_peak - 1)
    with pytest.raises(ConfigError, match=r"config key 'stats_device'.*on cuda:0.*stats_device 'cpu'"):
        check_memory(cfg)
    _fake_gpus(monkeypatch, 1, p.device_peak)
    check_memory(cfg)
    two = _cfg(d, lazy_load=True, cal_nsamples=64, cal_seqlen=64, stats_device="cuda:1")
    with pytest.raises(ConfigError, match=r"stats_device.*names \['cuda:1'\], but this machine has only cuda:0"):
        check_placement(two, tmp_path)
    _fake_gpus(monkeypatch, 2, plan_experiment(two).other_gpus["cuda:1"] - 1, first=2**40)
    with pytest.raises(ConfigError, match=r"config key 'stats_device'.*on cuda:1"):
        check_memory(two)


def test_a_stats_device_gpu_that_is_not_there_fails_before_loading(tmp_path):
    from oats.preflight import check_placement

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    d = _llama_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"stats_device.*names \['cuda'\], but this machine has no CUDA device"):
        check_placement(_cfg(d, device="cpu", stats_device="cuda"), tmp_path)


def _tiny_run(stats_device, device=CPU):
    from oats.compressor import compress_model
    from oats.pipeline import capture_inputs
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = resolve(ConfigDict(dict(model="x", method="sparsegpt", sparsity=0.5, device=device.type, stats_device=stats_device)))
    home = device if stats_device is None else torch.device(stats_device)
    inputs = capture_inputs(model, ids, device, 2, hidden_device=home)
    assert all(h.device == home for h in inputs.hidden)
    records = compress_model(model, inputs, cfg, device, [0.5, 0.5])
    return model, records


def test_compression_with_statistics_apart_is_the_same_compression():
    model, records = _tiny_run(None)
    apart, records_apart = _tiny_run("cpu")
    for a, b in zip(model.state_dict().values(), apart.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["scaled_rel_error"] for r in records] == [r["scaled_rel_error"] for r in records_apart]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_block_with_statistics_on_the_cpu_matches_all_on_the_gpu():
    gpu = torch.device("cuda")
    model, records = _tiny_run(None, gpu)
    apart, records_apart = _tiny_run("cpu", gpu)
    for a, b in zip(model.state_dict().values(), apart.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stats_collector_serves_on_the_compute_device():
    from oats.pipeline import StatsCollector

    lin = torch.nn.Linear(8, 4)
    col = StatsCollector({"l": lin}, "gram", torch.float64, device=CPU, serve_device=torch.device("meta"))
    with col:
        lin(torch.randn(5, 8))
    st = col.stats("l")
    assert col.sq["l"].device == CPU and st.sq_norms.device.type == "meta" and st.gram.device.type == "meta"


def test_a_task_with_several_gpus_evaluates_placed_across_them():
    from oats.slurm import with_task_gpus

    cfg = resolve(ConfigDict(dict(model="smollm2-135m", method="wanda")))
    assert with_task_gpus(cfg, gpus=1).device_map is None
    placed = with_task_gpus(copy.deepcopy(cfg), gpus=4)
    assert placed.device_map == "auto" and cfg.device_map is None
    from oats.config import config_hash

    assert config_hash(placed) == config_hash(cfg)
    own = resolve(ConfigDict(dict(model="smollm2-135m", method="wanda", device_map="balanced")))
    assert with_task_gpus(own, gpus=4).device_map == "balanced"
    assert with_task_gpus(resolve(ConfigDict(dict(model="smollm2-135m", method="wanda", device="cpu"))), gpus=4).device_map is None


def test_plan_gpu_memory_that_is_not_a_size_is_one_line(capsys):
    import main

    assert main.main(["--plan", "--gpu-memory", "80Gigs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --gpu-memory: got '80Gigs'; a size is")

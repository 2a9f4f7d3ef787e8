"""Evaluation placed across devices (accelerate device maps, spilling to the CPU and to disk): the same
numbers as in memory, the model in memory put back exactly, the offload folder removed only with its
marker and only inside the experiment folder, every bad placement refused before any model loads, and
less resident memory when a lazily loaded model is offloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ml_collections import ConfigDict

from oats.config import ConfigError, resolve
from oats.placement import OFFLOAD_DIR, OFFLOAD_MARKER, device_map_for, explicit_map, place
from oats.preflight import block_bytes
from oats.sweep import run_all
from oats.tasks import TextTask
from oats.weights import InMemoryWeights

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=4, eval_batch_size=2, device="cpu")
FEW_MIB = {"cpu": "40MiB"}  # SmolLM2 (float32): 13.5 MiB a block, 108 MiB of embeddings: everything goes to disk


def _smollm2_cfg(**kw) -> ConfigDict:
    return resolve({"model": "smollm2-135m", "method": "dense", "name": "placed", **SMALL, **kw})


def _evaluate(model, tok, cfg, exp_dir: Path) -> dict:
    weights = InMemoryWeights(model)
    return TextTask(cfg, weights, tok, torch.device("cpu")).evaluate(weights, None, compressed=False, exp_dir=exp_dir)


def _zero_shot_task(shared: Path) -> str | None:
    from eval.zero_shot import TaskDataError, local_task_config

    for task in ("arc_easy", "piqa", "boolq"):
        try:
            local_task_config(task, shared)
            return task
        except TaskDataError:
            continue
    return None


def test_smollm2_offloaded_to_disk_evaluates_as_in_memory(smollm2, tmp_path):
    """Token perplexity (and zero-shot accuracy when a task file is staged) of SmolLM2 with nearly every
    weight on disk equals the in-memory numbers; afterwards the model holds its own tensors again."""
    from conftest import SHARED_DATA

    model, tok = smollm2
    task = _zero_shot_task(SHARED_DATA) if (SHARED_DATA / "README.md").is_file() else None
    extra = dict(zero_shot_tasks=[task], zero_shot_limit=4, zero_shot_batch_size=4, data_dir=str(SHARED_DATA)) if task else {}
    before = model.state_dict()  # the tensors themselves: placement must put back equal ones
    ref = _evaluate(model, tok, _smollm2_cfg(**extra), tmp_path / "memory")
    out = _evaluate(model, tok, _smollm2_cfg(device_map="auto", max_memory=FEW_MIB, **extra), tmp_path / "disk")

    assert "placement" not in ref
    assert out["metrics"]["ppl"]["pydoc"] == pytest.approx(ref["metrics"]["ppl"]["pydoc"], rel=1e-5)
    if task:
        assert out["metrics"]["zero_shot"][task] == pytest.approx(ref["metrics"]["zero_shot"][task], abs=1e-9)
        assert out["metrics"]["zero_shot_info"]["n"][task] == 4
        bits = out["metrics"]["zero_shot_info"]["per_example"][task]  # the record keeps each document's score
        assert len(bits) == 4 and bits == ref["metrics"]["zero_shot_info"]["per_example"][task]
    placement = out["placement"]
    assert placement["from"] == "in memory" and placement["input_device"] == "cpu"
    assert placement["blocks"].get("disk", 0) >= 25 and sum(placement["blocks"].values()) == 30, placement
    assert placement["offload_dir_removed"] is True and not (tmp_path / "disk" / OFFLOAD_DIR).exists()

    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(t.device.type == "cpu" for t in after.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight and type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model, "hf_device_map") and not hasattr(model.model.layers[3], "_hf_hook")


def _tiny(model_dir, name, **over) -> ConfigDict:
    base = dict(model=str(model_dir), method="oats", compress=True, num_iters=4, sparsity=0.5, cal_nsamples=4, cal_seqlen=64,
                cal_batch_size=2, name=name, **SMALL)
    return resolve({**base, **over})


def test_lazy_and_in_memory_runs_evaluate_placed_from_disk(tmp_path, tiny_model_dir):
    """Compress mode (factored layers with bitmask buffers): the in-memory model dispatched and the lazily written
    shards loaded placed, every block on disk, give the perplexity of the unplaced runs."""
    every_block_on_disk = ["model.embed_tokens=cpu", "model.layers=disk", "model.norm=cpu", "model.rotary_emb=cpu", "lm_head=cpu"]
    runs = {"mem": {}, "mem-placed": dict(device_map=every_block_on_disk),
            "lazy": dict(lazy_load=True), "lazy-placed": dict(lazy_load=True, device_map="auto", max_memory={"cpu": 200_000})}
    for name, over in runs.items():
        assert run_all([_tiny(tiny_model_dir, name, **over)], tmp_path) == {name: "ok"}, name
    rec = {n: json.loads((tmp_path / n / "result.json").read_text()) for n in runs}
    ppl = {n: r["metrics"]["ppl"]["pydoc"] for n, r in rec.items()}
    assert ppl["mem-placed"] == pytest.approx(ppl["mem"], rel=1e-5) and ppl["lazy-placed"] == pytest.approx(ppl["lazy"], rel=1e-5)
    assert ppl["lazy"] == pytest.approx(ppl["mem"], rel=1e-5)
    assert rec["mem-placed"]["placement"]["blocks"] == {"disk": 2} and rec["mem-placed"]["placement"]["from"] == "in memory"
    assert rec["lazy-placed"]["placement"]["from"] == "shards" and rec["lazy-placed"]["placement"]["blocks"].get("disk") == 2
    assert "placement" not in rec["mem"] and "placement" not in rec["lazy"]
    assert rec["mem-placed"]["forward"] and rec["mem-placed"]["config"]["device_map"] == every_block_on_disk
    for n in ("mem-placed", "lazy-placed"):
        assert not (tmp_path / n / OFFLOAD_DIR).exists()


def _tiny_lm(layers: int = 2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _on_disk(**kw) -> ConfigDict:
    return ConfigDict({**dict(name="t", device_map=["=disk"], max_memory=None, offload_dir=None, device="cpu", dtype="float32"), **kw})


def test_offload_folder_is_removed_only_with_its_marker_and_inside_the_experiment(tmp_path):
    model = _tiny_lm()
    exp = tmp_path / "exp"
    foreign = exp / OFFLOAD_DIR
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("someone's")
    with pytest.raises(RuntimeError, match=OFFLOAD_MARKER):
        place(model, _on_disk(), exp)
    assert (foreign / "notes.txt").read_text() == "someone's"  # never written into, never deleted

    (foreign / "notes.txt").unlink()
    (foreign / OFFLOAD_MARKER).touch()
    (foreign / "stale.dat").write_bytes(b"x")  # a killed run's leftover, marked: it is the runner's
    placed = place(model, _on_disk(), exp)
    assert (foreign / OFFLOAD_MARKER).is_file() and not (foreign / "stale.dat").exists() and (foreign / "index.json").is_file()
    assert placed.close()["offload_dir_removed"] is True and not foreign.exists()

    placed = place(model, _on_disk(), exp)
    (foreign / OFFLOAD_MARKER).unlink()  # the marker gone: the folder is no longer provably the runner's
    with pytest.raises(RuntimeError, match="marker"):
        placed.close()
    assert foreign.is_dir() and any(foreign.glob("*.dat"))

    elsewhere = tmp_path / "scratch"
    placed = place(model, _on_disk(offload_dir=str(elsewhere)), tmp_path / "exp2")
    summary = placed.close()
    assert summary["offload_dir"] == str(elsewhere / "t") and summary["offload_dir_removed"] is False
    assert (elsewhere / "t" / OFFLOAD_MARKER).is_file()  # outside the experiment folder: left in place
    placed = place(model, _on_disk(offload_dir=str(elsewhere)), tmp_path / "exp2")  # and reused, written anew
    placed.close()


def test_maps_balance_split_and_cover():
    model = _tiny_lm(layers=3)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    cfg = ConfigDict(dict(name="t", device_map="sequential", max_memory={"cpu": 10 * block}, device="cpu"))
    assert set(device_map_for(model, cfg).values()) == {"cpu"}
    cfg.max_memory = {"cpu": block // 2}
    dm = device_map_for(model, cfg)
    assert "" not in dm and set(dm.values()) == {"disk"}  # the whole model on disk, named by its parts
    with pytest.raises(ConfigError, match="device_map.*not modules"):
        device_map_for(model, ConfigDict(dict(device_map=["model.layer=disk", "lm_head=cpu"])))
    with pytest.raises(ConfigError, match="gives no device"):
        device_map_for(model, ConfigDict(dict(device_map=["model.layers=disk", "lm_head=cpu"])))
    assert explicit_map(["model.layers.0=cuda:1", "=cpu"]) == {"model.layers.0": "cuda:1", "": "cpu"}


def test_an_explicit_map_given_as_a_dict_is_stored_as_strings():
    cfg = resolve({"model": "smollm2-135m", "device_map": {"model.layers": "disk", "model.embed_tokens": "cpu", "": "cpu"}})
    assert cfg.device_map == ["model.layers=disk", "model.embed_tokens=cpu", "=cpu"]
    assert resolve(cfg.to_dict()).device_map == cfg.device_map


def test_keys_change_no_hash():
    from oats.config import config_hash

    plain = _smollm2_cfg()
    placed = _smollm2_cfg(device_map="balanced_low_0", max_memory={"cpu": "2GiB"}, offload_dir="/tmp/x")
    assert config_hash(placed) == config_hash(plain)


def test_block_bytes_of_smollm2_from_its_shapes():
    per_block = 576 * 576 * 2 + 2 * 576 * 3 * 64 + 3 * 576 * 1536 + 2 * 576
    assert block_bytes("smollm2-135m", "float32") == 4 * per_block
    assert block_bytes("smollm2-135m", "bfloat16") == 2 * per_block
    model = _smollm2_shapes()  # the hand count against the model's own config
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == per_block
    model.tie_weights()
    assert sum(p.numel() for p in model.parameters()) == 30 * per_block + 49152 * 576 + 576  # 134.5 M


def _smollm2_shapes():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from oats.plan import model_config

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(model_config("smollm2-135m"))


def _bad_cases(tmp_path: Path, tiny_dir: Path) -> dict[str, tuple[dict, str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    absent_gpu = f"cuda:{torch.cuda.device_count()}"
    tiny = {"model": str(tiny_dir)}
    return {
        "a GPU the machine lacks, in the map": (dict(device="auto", device_map=[f"model={absent_gpu}", "lm_head=cpu"]), "device_map"),
        "a GPU the machine lacks, in max_memory": (dict(device="auto", device_map="auto", max_memory={absent_gpu: "1GiB", "cpu": "1GiB"}), "max_memory"),
        "offload_dir below a file": (dict(device_map="auto", offload_dir=str(blocker / "offload")), "offload_dir"),
        "max_memory below one block": (dict(device_map="auto", max_memory={"cpu": "8MiB"}), "max_memory"),
        "max_memory without device_map": (dict(max_memory={"cpu": "1GiB"}), "max_memory"),
        "offload_dir without device_map": (dict(offload_dir=str(tmp_path / "o")), "offload_dir"),
        "an unknown strategy": (dict(device_map="fastest"), "device_map"),
        "a size accelerate cannot read": (dict(device_map="auto", max_memory={"cpu": "2 gigs"}), "max_memory"),
        "a device with a typo": (dict(device_map=["model=cuda0", "lm_head=cpu"]), "device_map"),
        "a GPU with device cpu": (dict(device="cpu", device_map="auto", max_memory={"cuda:0": "1GiB"}), "max_memory"),
        "a module the model lacks": (dict(tiny, device_map=["model.decoder=disk", "lm_head=cpu"]), "device_map"),
        "a map leaving tensors out": (dict(tiny, device_map=["model.layers=disk", "lm_head=cpu"]), "device_map"),
    }


def test_bad_placements_fail_naming_the_key_before_any_model_loads(tmp_path, capsys, monkeypatch, tiny_model_dir):
    import main
    import oats.models
    import oats.weights

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(oats.models, "load_model", boom)
    monkeypatch.setattr(oats.weights.LazyModel, "from_dir", boom)
    for i, (case, (over, key)) in enumerate(_bad_cases(tmp_path, tiny_model_dir).items()):
        exp = {"model": "smollm2-135m", "name": f"bad{i}", "eval_seqlen": 32, "eval_max_windows": 1, **over}
        f = tmp_path / f"bad{i}.py"
        f.write_text(f"CONFIGS = [{exp!r}]\n")
        assert main.main(["--config", str(f), "--out", str(tmp_path / "out")]) == 2, case
        err = capsys.readouterr().err.strip()
        assert f"config key '{key}'" in err and len(err.splitlines()) == 1, (case, err)


PEAK_SCRIPT = textwrap.dedent("""
    from ml_collections import ConfigDict
    CONFIGS = [ConfigDict(dict(model="smollm2-135m", method="dense", name={name!r}, eval_datasets=["pydoc"], eval_seqlen=64,
                               eval_max_windows=4, eval_batch_size=2, device="cpu", **{over!r}))]
""")


def _peak_run(tmp_path: Path, name: str, over: dict) -> dict:
    f = tmp_path / f"{name}.py"
    f.write_text(PEAK_SCRIPT.format(name=name, over=over))
    env = {**os.environ, "OATS_CACHE_DIR": os.environ.get("OATS_CACHE_DIR", str(ROOT / ".ci-cache"))}
    # Through a shell that forks: a process forked straight from this one would inherit its peak RSS
    # (Linux keeps ru_maxrss across fork + exec), and this test process holds SmolLM2 already.
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(f), "--out", str(tmp_path / "out")]
    subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], check=True, env=env, cwd=ROOT, capture_output=True, timeout=900)
    return json.loads((tmp_path / "out" / name / "result.json").read_text())


def test_offloading_a_lazily_loaded_model_lowers_peak_memory(tmp_path):
    """Each evaluation in its own process: SmolLM2 loaded whole, against SmolLM2 read from its shards
    straight to disk (lazy_load + device_map). The offloaded process peaks lower and measures the same."""
    whole = _peak_run(tmp_path, "whole", {})
    offloaded = _peak_run(tmp_path, "offloaded", dict(lazy_load=True, device_map="auto", max_memory=FEW_MIB))
    assert whole["status"] == offloaded["status"] == "ok"
    assert offloaded["metrics"]["ppl"]["pydoc"] == pytest.approx(whole["metrics"]["ppl"]["pydoc"], rel=1e-5)
    rss = {"whole": whole["peak_memory_mb"]["cpu_rss"], "offloaded": offloaded["peak_memory_mb"]["cpu_rss"]}
    print(f"peak RSS MiB: {rss}")
    assert rss["offloaded"] < rss["whole"] - 200, rss  # the model's 513 MiB of weights never all resident


def _csr_folder(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A tiny compressed model (one layer of in_features 128 % 32 == 0, the others 64) saved, then its
    safetensors rewritten in the older CSR form: ``crow_indices`` and ``col_indices`` instead of ``mask``."""
    from safetensors.torch import load_file, save_file

    from factored import bitmask as bm
    from factored.module import SparseLowRankLinear, compressed_layers, save_compressed, set_module

    model = _tiny_lm()
    g = torch.Generator().manual_seed(1)
    for i, (name, lin) in enumerate([(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]):
        W = lin.weight.detach()
        r = i % 3
        set_module(model, name, SparseLowRankLinear.from_factors(W * (torch.rand(W.shape, generator=g) < 0.4),
                                                               torch.randn(W.shape[0], r, generator=g) * 0.1,
                                                               torch.randn(r, W.shape[1], generator=g) * 0.1))
    path = save_compressed(model, tmp_path / "csr")
    layers = compressed_layers(model)
    for f in path.glob("*.safetensors"):
        state = load_file(str(f))
        for k in [k for k in state if k.endswith(".mask")]:
            crow, col = bm.to_csr_indices(state.pop(k), layers[k[: -len(".mask")]].in_features)
            state[k[: -len("mask")] + "crow_indices"], state[k[: -len("mask")] + "col_indices"] = crow, col
        save_file(state, str(f), metadata={"format": "pt"})
    assert not any(".mask" in k for f in path.glob("*.safetensors") for k in load_file(str(f)))
    return model, path


@pytest.mark.parametrize("device_map", [["model.layers=disk", "model.embed_tokens=cpu", "model.norm=cpu", "model.rotary_emb=cpu", "lm_head=cpu"],
                                        ["=cpu"]])
def test_a_folder_saved_in_csr_form_loads_lazily_and_placed(tmp_path, device_map):
    from factored.module import compressed_layers, load_compressed
    from oats.placement import load_placed
    from oats.weights import LazyModel

    model, path = _csr_folder(tmp_path)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.allclose(load_compressed(path)(ids).logits, ref, atol=1e-5)  # in memory (load_state_dict)
    want = {n: m.mask for n, m in compressed_layers(model).items()}

    lazy = LazyModel.from_dir(path)
    for i in range(lazy.n_blocks):
        lazy.load_block(i)
    got = compressed_layers(lazy.model)
    assert got.keys() == want.keys() and all(torch.equal(got[n].mask, want[n]) for n in want)

    placed = load_placed(path, ConfigDict(dict(name="t", device_map=device_map, max_memory=None, offload_dir=None, device="cpu",
                                               dtype="float32")), tmp_path / "exp")
    try:
        with torch.no_grad():
            out = placed.model(ids).logits
        assert torch.allclose(out, ref, atol=1e-5)
    finally:
        placed.close()

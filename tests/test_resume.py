"""Resume inside an experiment: a run killed after block k restarts there and ends exactly where an
uninterrupted run ends (same weights bit for bit, same metrics, same per-layer records).

The end-to-end test runs the embedded SmolLM2-135M (real weights and tokenizer) cut to its first
``N_BLOCKS`` blocks, so that the three compressions (reference, killed, resumed) stay fast on 2 cores."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from ml_collections import ConfigDict

import eval.evaluate
from oats.checkpoint import CHECKPOINT_DIR, MARKER, BlockCheckpointer
from oats.config import config_hash, resolve
from oats.pipeline import BlockInputs
from oats.sweep import run_all
from tests.conftest import tiny_model

INTERRUPT_AFTER = 4  # kill the run once block 4 (0-based) is checkpointed
N_BLOCKS = 10


def _cfg(**over) -> ConfigDict:
    base = dict(model="smollm2-135m", method="wanda", sparsity=0.5, cal_dataset="pydoc", cal_nsamples=4, cal_seqlen=64,
                cal_batch_size=2, eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=2, device="cpu", name="resume-wanda")
    return resolve({**base, **over})


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so run_all's failure handling does not catch it."""


@pytest.fixture
def weight_digests(monkeypatch):
    """Digest of every tensor of the model each evaluation sees (the final compressed weights)."""
    seen: list[dict[str, str]] = []
    real = eval.evaluate.evaluate

    def spy(cfg, tokens_of, tokenizer, token_perplexity, whole_model):
        model = whole_model()
        seen.append({k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()})
        return real(cfg, tokens_of, tokenizer, token_perplexity, whole_model)

    monkeypatch.setattr(eval.evaluate, "evaluate", spy)
    return seen


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture
def short_smollm2(smollm2, monkeypatch):
    """Every load_model call in the runner gets a fresh copy of SmolLM2 cut to N_BLOCKS blocks."""
    import copy

    import oats.models

    model, tok = smollm2

    def load(name, dtype="float32"):
        m = copy.deepcopy(model)
        del m.model.layers[N_BLOCKS:]
        m.config.num_hidden_layers = N_BLOCKS
        return m, tok

    monkeypatch.setattr(oats.models, "load_model", load)


def test_interrupted_run_resumes_to_identical_result(tmp_path, short_smollm2, weight_digests, monkeypatch):
    ref_out, out = tmp_path / "reference", tmp_path / "resumed"
    cfg = _cfg()
    assert run_all([cfg], ref_out) == {cfg.name: "ok"}
    reference = json.loads((ref_out / cfg.name / "result.json").read_text())

    cfg_ck = _cfg(checkpoint_blocks=True)
    assert config_hash(cfg_ck) == config_hash(cfg)  # checkpointing changes nothing in the result
    real_save = BlockCheckpointer.save

    def save_then_die(self, i, *args, **kwargs):
        real_save(self, i, *args, **kwargs)
        if i == INTERRUPT_AFTER:
            raise _Killed

    monkeypatch.setattr(BlockCheckpointer, "save", save_then_die)
    with pytest.raises(_Killed):
        run_all([cfg_ck], out)
    ck = out / cfg.name / CHECKPOINT_DIR
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["last_block"] == INTERRUPT_AFTER and (ck / MARKER).is_file()
    assert sorted(p.name for p in ck.glob("block_*.safetensors")) == [f"block_{j:05d}.safetensors" for j in range(INTERRUPT_AFTER + 1)]
    assert [p.name for p in ck.glob("state_*.pt")] == [f"state_{INTERRUPT_AFTER:05d}.pt"]  # older states removed
    assert not (out / cfg.name / "result.json").exists()

    monkeypatch.setattr(BlockCheckpointer, "save", real_save)
    resumed_from = []
    real_load = BlockCheckpointer.load
    monkeypatch.setattr(BlockCheckpointer, "load", lambda self, *a, **k: resumed_from.append(r := real_load(self, *a, **k)) or r)
    assert run_all([cfg_ck], out) == {cfg.name: "ok"}
    assert resumed_from[0] is not None and resumed_from[0].last_block == INTERRUPT_AFTER
    result = json.loads((out / cfg.name / "result.json").read_text())

    assert result["resumed_after_block"] == INTERRUPT_AFTER + 1
    assert result["metrics"] == reference["metrics"]  # exactly equal floats
    assert _strip(result["layers"]) == _strip(reference["layers"])
    assert result["achieved_sparsity"] == reference["achieved_sparsity"]
    assert weight_digests[-1] == weight_digests[0]  # final weights identical bit for bit
    assert not ck.exists()  # a finished experiment's checkpoint is deleted ...
    assert (out / cfg.name / "result.json").is_file()  # ... and nothing else


def _inputs(seed: int) -> BlockInputs:
    g = torch.Generator().manual_seed(seed)
    return BlockInputs([torch.randn(2, 5, 64, generator=g)], {2: {"position_ids": torch.arange(5)[None], "attention_mask": None}})


def test_checkpoint_roundtrip_stale_hash_and_safe_clear(tmp_path):
    model = tiny_model("llama", layers=3)
    exp = tmp_path / "exp"
    ck = BlockCheckpointer(exp, "aaaa")
    block = model.model.layers[1]
    with torch.no_grad():
        block.mlp.up_proj.weight.mul_(0.0)
    inputs = _inputs(0)
    ck.save(0, model.model.layers[0], _inputs(1), [{"layer": "0.x"}], [0.5, 0.5, 0.5])
    ck.save(1, block, inputs, [{"layer": "0.x"}, {"layer": "1.x"}], [0.5, 0.5, 0.5], {"lod": [1, 2, 3]})
    assert ck.last_block() == 1

    state = BlockCheckpointer(exp, "aaaa").load()
    assert state.last_block == 1 and state.records == [{"layer": "0.x"}, {"layer": "1.x"}]
    assert state.layerwise_info == {"lod": [1, 2, 3]} and state.sparsities == [0.5, 0.5, 0.5]
    assert torch.equal(state.inputs.hidden[0], inputs.hidden[0]) and torch.equal(state.inputs.kwargs[2]["position_ids"], torch.arange(5)[None])

    fresh = tiny_model("llama", layers=3)
    assert not torch.equal(fresh.model.layers[1].mlp.up_proj.weight, block.mlp.up_proj.weight)
    ck.restore_blocks(fresh, 1)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)

    other = exp / "result.json"
    other.write_text("{}")
    assert BlockCheckpointer(exp, "bbbb").last_block() is None
    assert BlockCheckpointer(exp, "bbbb").load() is None  # stale: removed, run starts over
    assert not (exp / CHECKPOINT_DIR).exists() and other.is_file()

    # clear() refuses a directory that is not ours
    (exp / CHECKPOINT_DIR).mkdir()
    (exp / CHECKPOINT_DIR / "precious.txt").write_text("x")
    with pytest.raises(RuntimeError, match="refusing"):
        BlockCheckpointer(exp, "aaaa").clear()
    assert (exp / CHECKPOINT_DIR / "precious.txt").is_file()


def test_restore_takes_blocks_whose_layers_were_replaced(tmp_path):
    """Compress mode swaps nn.Linear for SparseLowRankLinear: the saved block comes back with its new
    structure, from safetensors and the block's JSON (nothing unpickled)."""
    from factored.module import SparseLowRankLinear

    model = tiny_model("llama", layers=2)
    block = model.model.layers[0]
    W = block.mlp.down_proj.weight.detach()
    S = W * (torch.rand_like(W) > 0.5)
    block.mlp.down_proj = SparseLowRankLinear.from_factors(S, torch.randn(64, 8) * 0.01, torch.randn(8, 128) * 0.01)  # rank 8
    ck = BlockCheckpointer(tmp_path / "exp", "cccc")
    ck.save(0, block, _inputs(0), [], [0.5, 0.5])
    fresh = tiny_model("llama", layers=2)
    ck.restore_blocks(fresh, 0)
    restored = fresh.model.layers[0].mlp.down_proj
    assert isinstance(restored, SparseLowRankLinear) and restored.rank == 8 and restored.nnz == block.mlp.down_proj.nnz
    assert torch.equal(restored.dense_weight(), block.mlp.down_proj.dense_weight())
    ids = torch.randint(4, 128, (1, 9))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits)

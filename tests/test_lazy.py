"""The bigger-than-memory path: a model read block by block from safetensors shards compresses to the
very same weights and records as the in-memory path, writes a loadable sharded checkpoint, evaluates
streamed to the same perplexity, and resumes from block checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from ml_collections import ConfigDict
from transformers import AutoModelForCausalLM

from oats.checkpoint import BlockCheckpointer
from oats.config import ConfigError, resolve
from oats.tasks import streamed_perplexity
from oats.weights import INDEX_FILE, LazyModel, ShardedWeights, block_shard
from oats.sweep import run_all
from eval.perplexity import perplexity
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, smollm2):
    """A 3-block random Llama with tied embeddings and SmolLM2's tokenizer, saved in several shards."""
    from transformers import LlamaConfig

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="100KB")
    tok.save_pretrained(path)
    assert (path / INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


def _cfg(model_dir, **over) -> ConfigDict:
    base = dict(model=str(model_dir), method="wanda", sparsity=0.5, cal_dataset="pydoc", cal_nsamples=4, cal_seqlen=64,
                cal_batch_size=2, eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=3, device="cpu", name="lazy", save_model=True)
    return resolve({**base, **over})


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_lazy_compression_matches_in_memory(tmp_path, sharded_dir):
    assert run_all([_cfg(sharded_dir)], tmp_path / "whole") == {"lazy": "ok"}
    assert run_all([_cfg(sharded_dir, lazy_load=True)], tmp_path / "lazy") == {"lazy": "ok"}
    whole = json.loads((tmp_path / "whole" / "lazy" / "result.json").read_text())
    lazy = json.loads((tmp_path / "lazy" / "lazy" / "result.json").read_text())
    assert lazy["lazy_load"] and _strip(lazy["layers"]) == _strip(whole["layers"])
    assert lazy["achieved_sparsity"] == whole["achieved_sparsity"] and 0.49 < lazy["achieved_sparsity"] < 0.51
    assert lazy["metrics"]["ppl"]["pydoc"] == pytest.approx(whole["metrics"]["ppl"]["pydoc"], rel=1e-5)

    out = tmp_path / "lazy" / "lazy" / "model"
    assert {block_shard(i) for i in range(3)} <= {p.name for p in out.iterdir()}
    a, b = _weights(out), _weights(tmp_path / "whole" / "lazy" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    q = a["model.layers.1.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() == pytest.approx(0.5, abs=1e-3)  # really pruned


def test_lazy_model_frees_blocks_and_streams_exact_perplexity(sharded_dir):
    lazy = LazyModel.from_dir(sharded_dir)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    assert lazy.head_names == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] and lazy.tied
    lazy.load_block(1)
    block = lazy.model.model.layers[1]
    ref = AutoModelForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32)
    assert torch.equal(block.mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)
    lazy.free_block(1)
    assert all(p.device.type == "meta" for p in block.parameters())

    tokens = torch.randint(5, 1000, (1, 5 * 32 + 7))
    got = streamed_perplexity(lazy, tokens, 32, 4, torch.device("cpu"), batch_size=3)  # 4 windows, ragged batches
    assert got == pytest.approx(perplexity(ref, tokens, 32, 4, 1, "cpu"), rel=1e-6)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # everything freed again
    with pytest.raises(KeyError, match="no shard"):
        ShardedWeights(sharded_dir).load(["model.layers.9.mlp.up_proj.weight"])


def test_lazy_resume_after_kill(tmp_path, sharded_dir, monkeypatch):
    cfg = _cfg(sharded_dir, lazy_load=True, checkpoint_blocks=True)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    run_all([_cfg(sharded_dir, lazy_load=True)], ref_out)
    real_save = BlockCheckpointer.save

    class Killed(BaseException):
        pass

    def save_then_die(self, i, *a, **k):
        real_save(self, i, *a, **k)
        if i == 1:
            raise Killed

    monkeypatch.setattr(BlockCheckpointer, "save", save_then_die)
    with pytest.raises(Killed):
        run_all([cfg], out)
    assert not list((out / "lazy" / "checkpoint").glob("block_*"))  # lazy mode: the shards are the copies
    assert (out / "lazy" / "model" / block_shard(1)).is_file() and not (out / "lazy" / "model" / block_shard(2)).exists()
    monkeypatch.setattr(BlockCheckpointer, "save", real_save)
    assert run_all([cfg], out) == {"lazy": "ok"}
    ref = json.loads((ref_out / "lazy" / "result.json").read_text())
    got = json.loads((out / "lazy" / "result.json").read_text())
    assert got["resumed_after_block"] == 2
    assert got["metrics"] == ref["metrics"] and _strip(got["layers"]) == _strip(ref["layers"])
    a, b = _weights(out / "lazy" / "model"), _weights(ref_out / "lazy" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "lazy" / "checkpoint").exists()


def _smollm2_cfg(**over) -> ConfigDict:
    base = dict(model="smollm2-135m", cal_dataset="pydoc", cal_nsamples=2, cal_seqlen=32, cal_batch_size=2,
                eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=2, device="cpu", name="x")
    return resolve({**base, **over})


PARITY = {
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt", targets=["self_attn.q_proj", "mlp.down_proj"]),
    "oats": dict(method="oats", num_iters=2, targets=["self_attn.o_proj", "mlp.up_proj"]),
    "oats-compress": dict(method="oats", num_iters=2, compress=True, targets=["self_attn.o_proj", "mlp.up_proj"]),
    "owl-wanda": dict(method="wanda", layerwise="owl"),
}


@pytest.mark.parametrize("variant", list(PARITY))
def test_lazy_and_in_memory_agree_on_the_embedded_model(variant, tmp_path, smollm2):
    """One lifecycle: lazy_load gives the in-memory run's layers and metrics (compress mode and OWL included)."""
    over = PARITY[variant]
    assert run_all([_smollm2_cfg(**over)], tmp_path / "mem") == {"x": "ok"}
    assert run_all([_smollm2_cfg(lazy_load=True, **over)], tmp_path / "lazy") == {"x": "ok"}
    mem = json.loads((tmp_path / "mem" / "x" / "result.json").read_text())
    lazy = json.loads((tmp_path / "lazy" / "x" / "result.json").read_text())
    assert lazy["lazy_load"] and not mem["lazy_load"]
    assert _strip(lazy["layers"]) == _strip(mem["layers"]) and lazy["block_sparsity"] == mem["block_sparsity"]
    assert lazy["metrics"]["ppl"]["pydoc"] == pytest.approx(mem["metrics"]["ppl"]["pydoc"], rel=1e-5)
    assert not (tmp_path / "lazy" / "x" / "model").exists()  # save_model False: the lazy shards are removed


def test_lazy_zero_shot_matches_in_memory(tmp_path, smollm2, shared_data):
    over = dict(method="wanda", eval_datasets=[], zero_shot_tasks=["boolq"], zero_shot_limit=4, data_dir=str(shared_data))
    run_all([_smollm2_cfg(**over)], tmp_path / "mem")
    run_all([_smollm2_cfg(lazy_load=True, **over)], tmp_path / "lazy")
    mem = json.loads((tmp_path / "mem" / "x" / "result.json").read_text())
    lazy = json.loads((tmp_path / "lazy" / "x" / "result.json").read_text())
    assert mem["status"] == lazy["status"] == "ok", (mem.get("error"), lazy.get("error"))
    assert lazy["metrics"]["zero_shot"] == pytest.approx(mem["metrics"]["zero_shot"])
    # lm_eval got the saved model placed: about two blocks' weights in memory, the others read from their shards
    blocks = lazy["placement"]["blocks"]
    assert blocks.get("disk", 0) >= 25 and sum(blocks.values()) == 30 and "placement" not in mem, blocks

"""Architecture adapters: blocks found on every supported family, fused projections split into their
logical matrices, each budgeted exactly, and written back fused; targets/ignore patterns."""
from __future__ import annotations

import pytest
import torch
from ml_collections import ConfigDict

from baselines.masks import layer_mask
from sparse_lowrank.common import oats_budget
from oats.architectures import ArchitectureError, architecture_of, get_blocks, linear_layers, matrices
from oats.compressor import compress_model
from oats.config import resolve
from oats.pipeline import capture_inputs


def _tiny(arch: str, layers: int = 2):
    from transformers import (AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                              Qwen2Config)

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    cfg = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
        "phi3": lambda: Phi3Config(**common, pad_token_id=0),
        "opt": lambda: OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=layers, num_attention_heads=4,
                                 max_position_embeddings=128, word_embed_proj_dim=64),
        "gpt_neox": lambda: GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                          num_attention_heads=4, max_position_embeddings=128),
    }[arch]()
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()


def _cfg(**kw) -> ConfigDict:
    return resolve(ConfigDict({"model": "tiny", "cal_batch_size": 2, **kw}))


def _inputs(model):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return capture_inputs(model, ids, torch.device("cpu"), 2)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "opt", "gpt_neox"])
def test_every_family_streams_and_compresses_every_matrix(arch):
    model = _tiny(arch)
    blocks = get_blocks(model)
    assert len(blocks) == 2
    a = architecture_of(model)
    names = [m.name for m in matrices(0, blocks[0], a, model.config)]
    n_linear = len(linear_layers(blocks[0]))
    fused = {"phi3": 2, "gpt_neox": 1}.get(arch, 0)
    # a fused layer with p parts adds p - 1 logical matrices
    assert len(names) == n_linear + {"phi3": 3, "gpt_neox": 2}.get(arch, 0) if fused else len(names) == n_linear
    recs = compress_model(model, _inputs(model), _cfg(method="wanda", sparsity=0.5), torch.device("cpu"), [0.5, 0.5])
    assert len(recs) == 2 * len(names)
    for r in recs:
        assert r["kept_params"] == r["shape"][0] * (r["shape"][1] - int(r["shape"][1] * 0.5))  # per row, every matrix


def test_phi3_fused_parts_are_budgeted_per_logical_matrix_and_written_back():
    model = _tiny("phi3")
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    block = get_blocks(model)[0]
    before = {n: l.weight.detach().clone() for n, l in linear_layers(block).items()}
    cfg = _cfg(method="magnitude", sparsity=0.3)  # magnitude ranks per *layer*: a per-part threshold differs from a fused one
    recs = compress_model(model, _inputs(model), cfg, torch.device("cpu"), [0.3, 0.3])
    by = {r["layer"]: r for r in recs if r["block"] == 0}
    assert [k for k in by if "qkv_proj" in k] == ["0.self_attn.qkv_proj:q", "0.self_attn.qkv_proj:k", "0.self_attn.qkv_proj:v"]
    assert by["0.self_attn.qkv_proj:q"]["shape"] == [q, c.hidden_size] and by["0.self_attn.qkv_proj:k"]["shape"] == [kv, c.hidden_size]
    assert by["0.mlp.gate_up_proj:gate"]["shape"] == [c.intermediate_size, c.hidden_size]
    for r in by.values():
        n = r["shape"][0] * r["shape"][1]
        assert r["kept_params"] == n - int(n * 0.3)  # exact per logical matrix
    W = before["self_attn.qkv_proj"]
    parts = [W[:q], W[q : q + kv], W[q + kv :]]
    expect = torch.cat([p * layer_mask(p.abs(), 0.3) for p in parts])
    assert torch.equal(block.self_attn.qkv_proj.weight, expect)
    whole = W * layer_mask(W.abs(), 0.3)
    assert not torch.equal(expect, whole)  # the split really matters


def test_neox_interleaved_qkv_rows_go_back_where_they_came_from():
    model = _tiny("gpt_neox")
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    block = get_blocks(model)[0]
    W = block.attention.query_key_value.weight.detach().clone()
    compress_model(model, _inputs(model), _cfg(method="magnitude", sparsity=0.4), torch.device("cpu"), [0.4, 0.4])
    view = W.view(c.num_attention_heads, 3, hd, -1)
    expect = torch.empty_like(view)
    for j in range(3):
        part = view[:, j].reshape(-1, W.shape[1])
        expect[:, j] = (part * layer_mask(part.abs(), 0.4)).view(c.num_attention_heads, hd, -1)
    assert torch.equal(block.attention.query_key_value.weight, expect.reshape_as(W))


def test_phi3_oats_compress_mode_uses_each_parts_budget_and_matches_dense_merge():
    from factored.module import SparseLowRankLinear

    model = _tiny("phi3")
    dense_copy = _tiny("phi3")
    inputs = _inputs(model)
    recs = compress_model(model, inputs, _cfg(method="oats", sparsity=0.5, num_iters=3, compress=True), torch.device("cpu"), [0.5, 0.5])
    compress_model(dense_copy, _inputs(dense_copy), _cfg(method="oats", sparsity=0.5, num_iters=3), torch.device("cpu"), [0.5, 0.5])
    for r in recs:
        b = oats_budget(r["shape"][0], r["shape"][1], 0.5, 0.3)
        assert r["rank"] == b.rank and r["kept_params"] == b.kept_params
    mod = get_blocks(model)[0].self_attn.qkv_proj
    assert isinstance(mod, SparseLowRankLinear)
    ranks = [r["rank"] for r in recs if r["layer"].startswith("0.self_attn.qkv_proj")]
    assert mod.rank == sum(ranks)
    dense = get_blocks(dense_copy)[0].self_attn.qkv_proj.weight
    assert torch.allclose(mod.dense_weight(), dense, atol=1e-5)
    x = torch.randn(3, 64)
    assert torch.allclose(mod(x), x @ dense.T, atol=1e-4)


def test_targets_and_ignore_select_matrices():
    model = _tiny("phi3")
    block = get_blocks(model)[1]
    a = architecture_of(model)
    names = lambda **kw: [m.name for m in matrices(1, block, a, model.config, **kw)]  # noqa: E731
    assert names(targets=["self_attn.*"]) == ["self_attn.o_proj", "self_attn.qkv_proj:q", "self_attn.qkv_proj:k", "self_attn.qkv_proj:v"]
    assert names(ignore=["mlp.*"]) == names(targets=["self_attn.*"])
    assert names(ignore=["1.*"]) == []
    assert names(targets=["0.*"]) == []
    with pytest.raises(ArchitectureError, match="only parts"):
        names(ignore=["*:k"])
    recs = compress_model(_tiny("llama"), _inputs(_tiny("llama")), _cfg(method="wanda", ignore=["*.down_proj", "0.*"]),
                          torch.device("cpu"), [0.5, 0.5])
    assert {r["layer"] for r in recs} == {f"1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}

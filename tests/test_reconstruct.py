"""block_updates.reconstruct: block reconstruction on a tiny random Llama block keeps every mask bit, keeps
pruned entries exactly 0, lowers the block's output error, and leaves the block as it found it."""
from __future__ import annotations

import copy

import pytest
import torch

from baselines import wanda
from sparse_lowrank import gram_slr
from oats.interface import Budget, CompressedWeight
from oats.architectures import get_blocks, linear_layers
from oats.pipeline import StatsCollector, capture_inputs, run_block
from tests.conftest import tiny_model
from block_updates.reconstruct import KEYS, reconstruct_block

CFG = {"recon_lr": 1e-3, "recon_epochs": 4, "recon_batch_size": 2, "recon_schedule": "cosine"}


def _setup(dtype=torch.float32, stats_kind="diag"):
    model = tiny_model("llama", layers=2, seed=0).to(dtype)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    inp = capture_inputs(model, ids, torch.device("cpu"), batch_size=4)
    block = get_blocks(model)[0]
    layers = linear_layers(block)
    with torch.no_grad(), StatsCollector(layers, stats_kind) as sc:
        targets = []
        for h in inp.hidden:
            targets.append(run_block(block, h, inp.kwargs_for(h)))
            sc.end_batch()
    return block, layers, sc, inp, targets


def _installed_mse(block, answers, inp, targets) -> float:
    """MSE of a copy of the block with the answers written into its linears (independent of the module swap)."""
    b = copy.deepcopy(block)
    with torch.no_grad():
        for name, cw in answers.items():
            lin = b.get_submodule(name)
            lin.weight.copy_(cw.to_dense().to(lin.weight.dtype))
        err = n = 0.0
        for h, y in zip(inp.hidden, targets):
            out = run_block(b, h, inp.kwargs_for(h)).float()
            err += float((out - y.float()).square().sum())
            n += y.numel()
    return err / n


def _check(block, before_state, answers, out, info, inp, targets):
    for name, cw in answers.items():
        new = out[name]
        assert torch.equal(new.mask, cw.mask)  # bit for bit
        kept = new.sparse if new.is_factored else new.dense
        assert (kept[~new.mask] == 0).all()
        assert kept.dtype == (cw.sparse if cw.is_factored else cw.dense).dtype
        assert new.info.get("reconstructed") is True
    assert info["loss_after"] < info["loss_before"]
    # the reported losses are those of the given / returned weights written into the block
    assert info["loss_before"] == pytest.approx(_installed_mse(block, answers, inp, targets), rel=1e-3)
    assert info["loss_after"] == pytest.approx(_installed_mse(block, out, inp, targets), rel=1e-3)
    # the block is left with its original modules and dense weights, nothing requiring grad changed
    for name, t in before_state.items():
        assert torch.equal(block.state_dict()[name], t), name
    assert info["steps"] == 4 * 4 and info["epochs"] == 4 and info["seconds"] > 0


def test_wanda_masks_held_and_error_lowered():
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    modules_before = dict(block.named_modules())
    state = {k: v.clone() for k, v in block.state_dict().items()}
    out, info = reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, CFG, torch.device("cpu"))
    _check(block, state, answers, out, info, inp, targets)
    assert dict(block.named_modules()) == modules_before  # same module objects, same names
    assert all(p.grad is None for p in block.parameters())
    assert not out["mlp.down_proj"].is_factored
    # kept weights did move
    assert not torch.equal(out["mlp.down_proj"].dense, answers["mlp.down_proj"].dense)


def test_factored_sparse_plus_low_rank_trains_U_and_V():
    block, layers, sc, inp, targets = _setup(stats_kind="gram")
    cfg = {"rank_ratio": 0.3, "gram_slr_iters": 2}
    answers = {n: gram_slr.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.6), cfg) for n, l in layers.items()}
    assert all(cw.is_factored and cw.U.shape[1] > 0 for cw in answers.values())
    state = {k: v.clone() for k, v in block.state_dict().items()}
    out, info = reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, CFG, "cpu")
    _check(block, state, answers, out, info, inp, targets)
    q_old, q_new = answers["self_attn.q_proj"], out["self_attn.q_proj"]
    assert q_new.U.shape == q_old.U.shape and q_new.V.shape == q_old.V.shape
    assert not torch.equal(q_new.U, q_old.U) and not torch.equal(q_new.V, q_old.V)


def test_bfloat16_block_trains_float32_masters():
    block, layers, sc, inp, targets = _setup(dtype=torch.bfloat16)
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    assert answers["self_attn.q_proj"].dense.dtype == torch.bfloat16
    seen = []

    def hook(module, args, kwargs):  # during the call the block runs the swapped-in linears
        q = module.get_submodule("self_attn.q_proj")
        seen.append((type(q).__name__, q.weight.dtype, args[0].dtype if args else kwargs["hidden_states"].dtype))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    try:
        out, info = reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**CFG, "recon_norms": True}, "cpu")
    finally:
        handle.remove()
    assert set(seen) == {("MaskedLinear", torch.float32, torch.bfloat16)}
    assert info["loss_after"] < info["loss_before"]
    for name, cw in answers.items():
        assert torch.equal(out[name].mask, cw.mask) and (out[name].dense[~cw.mask] == 0).all()
        assert out[name].dense.dtype == torch.bfloat16
    # norms were trained and written back in place (bfloat16), the linears are untouched
    assert info["norms_trained"] == ["input_layernorm", "post_attention_layernorm"]
    assert block.input_layernorm.weight.dtype == torch.bfloat16
    assert not torch.equal(block.input_layernorm.weight, state["input_layernorm.weight"])
    assert torch.equal(block.self_attn.q_proj.weight, state["self_attn.q_proj.weight"])


def test_diverging_run_is_reverted_and_bad_keys_refused():
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    out, info = reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets,
                                  {"recon_lr": 10.0, "recon_epochs": 1, "recon_schedule": "constant"}, "cpu")
    assert info["reverted"] and info["loss_after"] > info["loss_before"]
    assert all(out[n] is answers[n] for n in answers)
    with pytest.raises(ValueError, match="recon_schedule"):
        reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {"recon_schedule": "exponential"}, "cpu")
    with pytest.raises(ValueError, match="recon_target"):
        reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {"recon_target": "final_logits"}, "cpu")
    bad = {"mlp.down_proj": CompressedWeight(dense=torch.zeros(3, 3), mask=torch.ones(3, 3, dtype=torch.bool))}
    with pytest.raises(ValueError, match="shape"):
        reconstruct_block(block, bad, inp.hidden, inp.kwargs_for, targets, CFG, "cpu")
    out, info = reconstruct_block(block, {}, inp.hidden, inp.kwargs_for, targets, CFG, "cpu")  # nothing to train
    assert out == {} and info["steps"] == 0 and info["loss_before"] == info["loss_after"] == pytest.approx(0.0, abs=1e-10)
    assert set(KEYS) == {"recon_lr", "recon_epochs", "recon_batch_size", "recon_schedule", "recon_norms", "recon_target",
                         "recon_window", "recon_dense_inputs", "recon_dense_inputs_decay", "recon_parts", "recon_holdout",
                         "recon_patience"}

"""block_updates.reconstruct beyond one block at a time: cross-block windows (recon_window), the dense
model's inputs (recon_dense_inputs), attention then MLP (recon_parts), early stopping on held-out
windows (recon_holdout, recon_patience), the linear schedule; the new keys keep the hashes of existing results."""
from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
from ml_collections import ConfigDict

import block_updates.reconstruct as rec
from block_updates.reconstruct import _slice_batch
from baselines import wanda
from oats import registry
from oats.architectures import get_blocks
from oats.compressor import compress_model
from oats.config import config_hash, resolve
from oats.interface import BlockChain, Budget
from oats.keys import ConfigError
from oats.pipeline import capture_inputs, run_block
from tests.conftest import tiny_model
from tests.test_reconstruct import _installed_mse, _setup

CPU = torch.device("cpu")


def _cfg(**kw):
    return resolve(ConfigDict({"model": "tiny", "method": "wanda", "cal_batch_size": 8, **kw}))


def _model_and_inputs(layers: int = 3):
    model = tiny_model("llama", layers=layers, seed=3)
    cal = capture_inputs(model, torch.randint(0, 128, (32, 64), generator=torch.Generator().manual_seed(2)), CPU, 8)
    held = capture_inputs(model, torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(7)), CPU, 8)
    return model, cal, held


@torch.no_grad()
def _outputs(model, inputs, upto: int | None = None) -> torch.Tensor:
    h = inputs.hidden
    for b in list(get_blocks(model))[:upto]:
        h = [run_block(b, x, inputs.kwargs_for(x)) for x in h]
    return torch.cat(h)


def _rel_err(model, dense, inputs, upto=None) -> float:
    ref, got = _outputs(dense, inputs, upto), _outputs(model, inputs, upto)
    return float((got - ref).square().mean() / ref.square().mean())


@pytest.fixture
def spy(monkeypatch):
    """Every call of the block update: (block, answers given, answers returned, hidden, targets, dense_hidden)."""
    calls = []

    def apply(block, answers, hidden, kwargs_for, targets, cfg, device, **kw):
        out, info = rec.reconstruct_block(block, answers, hidden, kwargs_for, targets, cfg, device, **kw)
        calls.append(dict(block=block, given=dict(answers), returned=out, hidden=list(hidden), targets=list(targets),
                          dense_hidden=kw.get("dense_hidden"), info=info))
        return out, info

    monkeypatch.setattr(rec, "BLOCK_UPDATE", dataclasses.replace(rec.BLOCK_UPDATE, apply=apply))
    registry.plugin.cache_clear()
    yield calls
    monkeypatch.undo()
    registry.plugin.cache_clear()


def test_cross_block_window_keeps_masks_and_lowers_held_out_error(spy):
    dense, cal, held = _model_and_inputs(layers=3)
    plain, recon = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_model(plain, cal, _cfg(), CPU, [0.5] * 3)
    recs = compress_model(recon, cal, _cfg(block_update="reconstruct", recon_epochs=4, recon_lr=1e-3, recon_window=2), CPU, [0.5] * 3)
    # windows [0, 2) and [2, 3): the first fitted as one chain of two blocks, named '<k>.<linear>'
    assert [c["info"]["steps"] for c in spy] == [8 * 4, 8 * 4] and len(spy) == 2
    assert isinstance(spy[0]["block"], BlockChain) and len(spy[0]["block"]) == 2 and len(spy[1]["block"]) == 1
    assert {n.split(".", 1)[0] for n in spy[0]["given"]} == {"0", "1"} and "1.mlp.down_proj" in spy[0]["given"]
    assert [r["block_update"]["window_blocks"] for r in recs if "block_update" in r] == [[0, 1], [0, 1], [2, 2]]
    # within a window the masks come from the un-updated earlier block, so they are the plain run's, bit for bit
    for (n, a), (_, b) in zip(plain.named_parameters(), recon.named_parameters()):
        if a.dim() == 2 and "layers.2." not in n and "embed" not in n:
            assert torch.equal(a == 0, b == 0), n
    for c in spy:
        for name, cw in c["given"].items():
            new = c["returned"][name]
            assert torch.equal(new.mask, cw.mask) and (new.dense[~new.mask] == 0).all(), name
    assert all(r["kept_params_after_block_update"] == r["kept_params"] for r in recs)
    # the window's loss is measured at its last block's output: before, that of the plain model's two blocks
    first = spy[0]["info"]
    plain_mse = float((_outputs(plain, cal, 2) - _outputs(dense, cal, 2)).square().mean())
    assert first["loss_before"] == pytest.approx(plain_mse, rel=1e-4)
    assert first["loss_after"] < first["loss_before"]
    # held-out windows: the reconstructed window's output, and the model's, are closer to the dense model's
    assert _rel_err(recon, dense, held, 2) < 0.7 * _rel_err(plain, dense, held, 2)
    assert _rel_err(recon, dense, held) < 0.7 * _rel_err(plain, dense, held)


def test_window_of_factored_answers_keeps_masks_rank_and_outputs(spy):
    """OATS answers (sparse + U V) in a window of 2: masks bit for bit, ranks kept; the next block's
    inputs are the updated window's outputs."""
    dense, cal, _ = _model_and_inputs(layers=2)
    model = copy.deepcopy(dense)
    seen = []
    compress_model(model, cal, _cfg(method="oats", num_iters=3, block_update="reconstruct", recon_epochs=2, recon_lr=1e-3,
                                    recon_window=2), CPU, [0.5, 0.5],
                   after_block=lambda i, b, nxt: seen.append(torch.cat(nxt.hidden).clone()))
    (call,) = spy
    for name, cw in call["given"].items():
        new = call["returned"][name]
        mask = cw.mask if cw.mask is not None else cw.sparse != 0
        assert new.is_factored and torch.equal(new.mask, mask) and torch.equal(new.sparse != 0, mask), name
        assert new.U.shape == cw.U.shape and new.V.shape == cw.V.shape
    assert not call["info"]["reverted"]
    torch.testing.assert_close(seen[-1], _outputs(model, cal), rtol=0, atol=0)


def test_window_targets_follow_recon_target(spy):
    """Second window [2, 4): 'dense_model' fits the dense model's activations after block 3, 'dense_block'
    the dense blocks 2 and 3 on the window's own inputs (the outputs of the updated blocks 0 and 1)."""
    dense, cal, _ = _model_and_inputs(layers=4)
    compress_model(copy.deepcopy(dense), cal, _cfg(block_update="reconstruct", recon_epochs=1, recon_window=2,
                                                   recon_target="dense_model"), CPU, [0.5] * 4)
    torch.testing.assert_close(torch.cat(spy[1]["targets"]), _outputs(dense, cal))
    model = copy.deepcopy(dense)
    compress_model(model, cal, _cfg(block_update="reconstruct", recon_epochs=1, recon_window=2), CPU, [0.5] * 4)
    window_inputs = _outputs(model, cal, 2)
    torch.testing.assert_close(torch.cat(spy[3]["hidden"]), window_inputs)
    expected = torch.cat([_chain(dense, x, cal) for x in spy[3]["hidden"]])
    torch.testing.assert_close(torch.cat(spy[3]["targets"]), expected)
    assert float((expected - _outputs(dense, cal)).abs().max()) > 1e-3  # the two targets differ here


@torch.no_grad()
def _chain(dense, x, cal):
    for b in list(get_blocks(dense))[2:]:
        x = run_block(b, x, cal.kwargs_for(x))
    return x


def test_dense_inputs_train_on_the_dense_models_inputs(spy):
    """recon_dense_inputs 1 (global propagation) trains exactly as plain reconstruction of the dense
    model's inputs against the dense block's outputs on them; the framework passes block i the dense
    model's inputs (block i-1's dense outputs)."""
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    g = torch.Generator().manual_seed(5)
    dense_h = [h + 0.3 * torch.randn(h.shape, generator=g) for h in inp.hidden]
    dense_y = [run_block(block, h, inp.kwargs_for(h)).detach() for h in dense_h]
    cfg = {"recon_lr": 1e-3, "recon_epochs": 3, "recon_batch_size": 2}
    gp, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_dense_inputs": 1.0}, CPU,
                                     dense_hidden=dense_h)
    plain, info_p = rec.reconstruct_block(block, answers, dense_h, inp.kwargs_for, dense_y, cfg, CPU)
    assert not info["reverted"] and not info_p["reverted"]
    for n in answers:
        assert torch.equal(gp[n].dense, plain[n].dense), n
    half, _ = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_dense_inputs": 0.5}, CPU,
                                    dense_hidden=dense_h)
    assert not torch.equal(half["mlp.down_proj"].dense, gp["mlp.down_proj"].dense)
    with pytest.raises(ValueError, match="dense_hidden"):
        rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_dense_inputs": 0.5}, CPU)

    dense, cal, _ = _model_and_inputs(layers=2)
    compress_model(copy.deepcopy(dense), cal, _cfg(block_update="reconstruct", recon_epochs=1, recon_dense_inputs=0.5,
                                                   recon_dense_inputs_decay=True), CPU, [0.5, 0.5])
    torch.testing.assert_close(torch.cat(spy[0]["dense_hidden"]), torch.cat(cal.hidden))
    torch.testing.assert_close(torch.cat(spy[1]["dense_hidden"]), _outputs(dense, cal, 1))
    assert spy[1]["info"]["dense_inputs"] == 0.5 and spy[1]["info"]["dense_inputs_decay"] is True


def test_attention_then_mlp_stages():
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    state = {k: v.clone() for k, v in block.state_dict().items()}
    cfg = {"recon_lr": 1e-3, "recon_epochs": 3, "recon_batch_size": 2, "recon_parts": "attn_mlp"}
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, cfg, CPU)
    assert [s["part"] for s in info["stages"]] == ["attention", "mlp"] and info["steps"] == 2 * 3 * 4
    assert info["loss_after"] < info["loss_before"]
    assert info["loss_after"] == pytest.approx(_installed_mse(block, out, inp, targets), rel=1e-3)
    for name, cw in answers.items():
        assert torch.equal(out[name].mask, cw.mask) and (out[name].dense[~cw.mask] == 0).all()
        assert not torch.equal(out[name].dense, cw.dense), name  # both parts trained
    for k, v in state.items():
        assert torch.equal(block.state_dict()[k], v), k
    # the attention stage alone fits the residual after attention: its stage only moves attention linears
    only_attn, _ = rec.reconstruct_block(block, {n: cw for n, cw in answers.items() if n.startswith("self_attn.")}, inp.hidden,
                                         inp.kwargs_for, targets, cfg, CPU)
    assert all(torch.equal(only_attn[n].dense, out[n].dense) for n in only_attn)
    chain = BlockChain([block])
    with pytest.raises(ValueError, match="recon_window 1"):
        rec.reconstruct_block(chain, {f"0.{n}": cw for n, cw in answers.items()}, inp.hidden, inp.kwargs_for, targets, cfg, CPU)


def _heldout_mse(block, answers, inp, targets, share):
    """Block-output MSE of the answers installed in a copy of the block, on the held-out windows only."""
    windows = [(i, j) for i, h in enumerate(inp.hidden) for j in range(h.shape[0])]
    pick = [windows[k] for k in rec.holdout_windows(len(windows), share)]
    h_held = torch.stack([inp.hidden[i][j] for i, j in pick])
    y_held = torch.stack([targets[i][j] for i, j in pick])
    held_inp = types.SimpleNamespace(hidden=[h_held], kwargs_for=lambda h: _slice_batch(inp.kwargs_for(inp.hidden[0]), h.shape[0],
                                                                                        inp.hidden[0].shape[0]))
    return _installed_mse(block, answers, held_inp, [y_held])


def test_early_stopping_stops_restores_the_best_epoch_and_splits_deterministically():
    """The held-out draw itself is tested in tests/test_holdout.py."""
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    cfg = {"recon_lr": 1e-3, "recon_epochs": 30, "recon_batch_size": 2, "recon_schedule": "constant", "recon_holdout": 0.25}
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, cfg, CPU)
    (stage,) = info["stages"]
    assert info["heldout_windows"] == 2 and stage["stopped_early"] and 1 <= stage["epochs_run"] < 30
    assert info["steps"] == stage["epochs_run"] * 3  # 6 training windows, 2 a step: the held-out ones never trained on
    assert stage["heldout_loss_best"] < stage["heldout_loss_before"]
    # the returned weights are the best epoch's: their held-out loss is the best one measured
    assert _heldout_mse(block, out, inp, targets, 0.25) == pytest.approx(stage["heldout_loss_best"], rel=1e-4)
    again, info2 = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, cfg, CPU)
    assert info2["stages"] == info["stages"] and all(torch.equal(again[n].dense, out[n].dense) for n in out)
    # more held-out windows than a calibration batch (4) holds
    _, info3 = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_holdout": 0.75, "recon_epochs": 2}, CPU)
    assert info3["heldout_windows"] == 6 and info3["steps"] == info3["stages"][0]["epochs_run"] * 1
    # a first epoch that does not lower the held-out loss: the given weights come back
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_lr": 3e-2}, CPU)
    assert info["stages"][0]["epochs_run"] == 1 and info["stages"][0]["heldout_loss_best"] == info["stages"][0]["heldout_loss_before"]
    assert all(torch.equal(out[n].dense, answers[n].dense) for n in answers)


def test_patience_trains_past_a_worse_epoch_and_restores_the_best_one():
    """At this learning rate the held-out loss first rises after epoch 1 (the default stops there); with a
    patience of 3 training goes on, finds a lower held-out loss later, stops 4 epochs after the best one
    and returns that epoch's weights. recon_patience 0 is the default, bit for bit."""
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    cfg = {"recon_lr": 1e-3, "recon_epochs": 12, "recon_batch_size": 2, "recon_schedule": "constant", "recon_holdout": 0.25}
    out0, info0 = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, cfg, CPU)
    out0b, info0b = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_patience": 0}, CPU)
    assert info0b["stages"] == info0["stages"] and all(torch.equal(out0b[n].dense, out0[n].dense) for n in out0)
    out3, info3 = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_patience": 3}, CPU)
    (s0,), (s3,) = info0["stages"], info3["stages"]
    assert s0["epochs_run"] == s0["best_epoch"] + 1 and s0["stopped_early"]
    assert 1 < s3["best_epoch"] < s3["epochs_run"] < 12 and s3["epochs_run"] == s3["best_epoch"] + 4 and s3["stopped_early"]
    assert s3["heldout_loss_best"] < s0["heldout_loss_best"] < s0["heldout_loss_before"]
    assert _heldout_mse(block, out3, inp, targets, 0.25) == pytest.approx(s3["heldout_loss_best"], rel=1e-4)
    assert info3["steps"] == s3["epochs_run"] * 3
    # no epoch ever beats the given weights: patience + 1 epochs run and the given weights come back
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets, {**cfg, "recon_lr": 1e-2, "recon_patience": 2}, CPU)
    assert info["stages"][0]["epochs_run"] == 3 and info["stages"][0]["best_epoch"] == 0
    assert not info["reverted"]  # restored by the early stop, not by the final revert (which would mask a missing restore)
    assert all(torch.equal(out[n].dense, answers[n].dense) for n in answers)
    # epochs run out inside the patience: the best (given) weights are restored all the same
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets,
                                      {**cfg, "recon_lr": 1e-2, "recon_patience": 5, "recon_epochs": 2}, CPU)
    assert info["stages"][0]["epochs_run"] == 2 and not info["stages"][0]["stopped_early"] and info["stages"][0]["patience"] == 5
    assert not info["reverted"]
    assert all(torch.equal(out[n].dense, answers[n].dense) for n in answers)


def test_linear_schedule_lowers_the_loss():
    block, layers, sc, inp, targets = _setup()
    answers = {n: wanda.compress_weight(l.weight.detach(), sc.stats(n), Budget(0.5)) for n, l in layers.items()}
    out, info = rec.reconstruct_block(block, answers, inp.hidden, inp.kwargs_for, targets,
                                      {"recon_lr": 1e-3, "recon_epochs": 3, "recon_batch_size": 2, "recon_schedule": "linear"}, CPU)
    assert info["schedule"] == "linear" and info["loss_after"] < info["loss_before"] and info["steps"] == 12


def test_new_keys_at_their_defaults_keep_existing_hashes():
    """Hashes computed before recon_window ... recon_holdout existed; set away from its default, each key is hashed."""
    base = {"model": "smollm2-135m", "method": "sparsegpt", "block_update": "reconstruct"}
    assert config_hash(resolve(ConfigDict(base))) == "d51325b3c98bf709"
    dm = {"model": "smollm2-135m", "method": "oats", "block_update": "reconstruct", "recon_target": "dense_model", "recon_epochs": 3}
    assert config_hash(resolve(ConfigDict(dm))) == "9c99d54e088889e9"
    assert config_hash(resolve(ConfigDict({**base, "recon_window": 1, "recon_holdout": 0.0}))) == "d51325b3c98bf709"
    hashes = {config_hash(resolve(ConfigDict({**base, **kw}))) for kw in
              ({"recon_window": 2}, {"recon_dense_inputs": 0.5}, {"recon_dense_inputs": 0.5, "recon_dense_inputs_decay": True},
               {"recon_parts": "attn_mlp"}, {"recon_holdout": 0.1}, {"recon_schedule": "linear"},
               {"recon_patience": 2, "recon_holdout": 0.1})}
    assert len(hashes) == 7 and "d51325b3c98bf709" not in hashes
    assert config_hash(resolve(ConfigDict({**base, "recon_patience": 0}))) == "d51325b3c98bf709"


@pytest.mark.parametrize("kw, key", [
    ({"recon_window": 2, "checkpoint_blocks": True}, "recon_window"),
    ({"recon_window": 2, "lazy_load": True}, "recon_window"),
    ({"recon_window": 2, "recon_parts": "attn_mlp"}, "recon_parts"),
    ({"recon_window": 0}, "recon_window"),
    ({"recon_dense_inputs": 1.5}, "recon_dense_inputs"),
    ({"recon_dense_inputs": 0.5, "checkpoint_blocks": True}, "recon_dense_inputs"),
    ({"recon_dense_inputs_decay": True}, "recon_dense_inputs_decay"),
    ({"recon_parts": "attention"}, "recon_parts"),
    ({"recon_holdout": 1.0}, "recon_holdout"),
    ({"recon_holdout": 0.2, "cal_nsamples": 1}, "recon_holdout"),
    ({"recon_patience": -1, "recon_holdout": 0.2}, "recon_patience"),
    ({"recon_patience": 2}, "recon_patience"),
])
def test_bad_combinations_refused_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        resolve(ConfigDict({"model": "smollm2-135m", "method": "wanda", "block_update": "reconstruct", **kw}))


def test_window_past_the_blocks_refused_by_the_preflight(tiny_model_dir, tmp_path):
    from oats.preflight import check_architecture

    cfg = resolve(ConfigDict({"model": str(tiny_model_dir), "method": "wanda", "block_update": "reconstruct", "recon_window": 3}))
    with pytest.raises(ConfigError, match="config key 'recon_window': got 3, but the model has 2 blocks; allowed values: 1 to 2"):
        check_architecture(cfg)
    check_architecture(resolve(ConfigDict({**cfg.to_dict(), "recon_window": 2, "name": None})))


def test_window_cannot_resume_from_a_block_checkpoint_nor_run_lazily():
    dense, cal, _ = _model_and_inputs(layers=2)
    cfg = _cfg(block_update="reconstruct", recon_window=2)
    with pytest.raises(ValueError, match="checkpoint_blocks False"):
        compress_model(copy.deepcopy(dense), cal, cfg, CPU, [0.5, 0.5], start_block=1)
    with pytest.raises(ValueError, match="lazy_load False"):
        compress_model(copy.deepcopy(dense), cal, cfg, CPU, [0.5, 0.5], weights=types.SimpleNamespace(lazy=True))

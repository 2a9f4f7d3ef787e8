"""The block update and the full-Gram method through the pipeline: masks kept bit for bit, the budget
recounted after reconstruction, a lower block output error, OATS's exact budget for gram_slr."""
from __future__ import annotations

import copy

import pytest
import torch
from ml_collections import ConfigDict

from sparse_lowrank.common import oats_budget
from oats.architectures import get_blocks
from oats.compressor import compress_model
from oats.config import resolve
from oats.pipeline import capture_inputs, run_block
from tests.conftest import tiny_model


def _cfg(**kw):
    return resolve(ConfigDict({"model": "tiny", "cal_batch_size": 2, **kw}))


def _setup():
    model = tiny_model("llama", layers=2, seed=3)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    return model, capture_inputs(model, ids, torch.device("cpu"), 2)


def _block0_error(dense, model, inputs):
    h = inputs.hidden[0]
    ref = run_block(get_blocks(dense)[0], h, inputs.kwargs_for(h))
    got = run_block(get_blocks(model)[0], h, inputs.kwargs_for(h))
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["wanda", "oats"])
def test_reconstruction_keeps_masks_and_budget_and_lowers_block_error(method):
    dense, inputs = _setup()
    plain, recon = copy.deepcopy(dense), copy.deepcopy(dense)
    extra = dict(num_iters=3) if method == "oats" else {}
    r_plain = compress_model(plain, inputs, _cfg(method=method, **extra), torch.device("cpu"), [0.5, 0.5])
    r_recon = compress_model(recon, inputs, _cfg(method=method, block_update="reconstruct", recon_epochs=5, recon_lr=1e-3, **extra),
                             torch.device("cpu"), [0.5, 0.5])
    assert [r["kept_params"] for r in r_recon] == [r["kept_params"] for r in r_plain]
    assert all("kept_params_after_block_update" in r for r in r_recon)
    if method == "wanda":  # dense answers: the zeros are the masks, bit for bit
        for (n, a), (_, b) in zip(plain.named_parameters(), recon.named_parameters()):
            if a.dim() == 2 and "layers.0." in n:  # block 1 sees other inputs after block 0 was reconstructed
                assert torch.equal(a == 0, b == 0), n
        assert all(r["kept_params_after_block_update"] == r["kept_params"] for r in r_recon)
    assert "block_update" in r_recon[0] and r_recon[0]["block_update"]["name"] == "reconstruct"
    assert _block0_error(dense, recon, inputs) < _block0_error(dense, plain, inputs)


def test_gram_slr_through_the_pipeline_hits_the_oats_budget():
    dense, inputs = _setup()
    recs = compress_model(copy.deepcopy(dense), inputs, _cfg(method="gram_slr", gram_slr_iters=3), torch.device("cpu"), [0.5, 0.5])
    for r in recs:
        b = oats_budget(r["shape"][0], r["shape"][1], 0.5, 0.3)
        assert r["rank"] == b.rank and r["kept_params"] == b.kept_params


def test_oats_plus_optima_from_configs():
    dense, inputs = _setup()
    recs = compress_model(copy.deepcopy(dense), inputs, _cfg(method="oats", num_iters=3, weight_update="optima"), torch.device("cpu"), [0.5, 0.5])
    assert all("optima_obj_after" in r and r["optima_obj_after"] <= r["optima_obj_before"] + 1e-9 for r in recs)
    for r in recs:
        b = oats_budget(r["shape"][0], r["shape"][1], 0.5, 0.3)
        assert r["kept_params"] <= b.kept_params


def test_dense_model_target_is_the_dense_models_own_activations(monkeypatch):
    """recon_target 'dense_model': block i is fitted to the dense model's activations after block i
    (the dense blocks run in sequence on the dense inputs), not to the dense block on compressed inputs."""
    import dataclasses

    import block_updates.reconstruct as rec
    from oats import registry

    dense, inputs = _setup()
    seen: list[list[torch.Tensor]] = []

    def spy(block, answers, hidden, kwargs_for, targets, cfg, device):
        seen.append([t.clone() for t in targets])
        return rec.reconstruct_block(block, answers, hidden, kwargs_for, targets, cfg, device)

    monkeypatch.setattr(rec, "BLOCK_UPDATE", dataclasses.replace(rec.BLOCK_UPDATE, apply=spy))
    registry.plugin.cache_clear()
    try:
        model = copy.deepcopy(dense)
        recs = compress_model(model, inputs, _cfg(method="wanda", block_update="reconstruct", recon_target="dense_model",
                                                  recon_epochs=2, recon_lr=1e-3), torch.device("cpu"), [0.5, 0.5])
    finally:
        monkeypatch.undo()
        registry.plugin.cache_clear()
    expected, h = [], list(inputs.hidden)
    for block in get_blocks(dense):
        h = [run_block(block, x, inputs.kwargs_for(x)) for x in h]
        expected.append(h)
    assert len(seen) == 2
    for got, want in zip(seen, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert any(r.get("block_update", {}).get("target") == "dense_model" for r in recs)


def test_dense_model_target_refuses_block_checkpoints():
    from oats.keys import ConfigError

    with pytest.raises(ConfigError, match="recon_target"):
        _cfg(method="wanda", block_update="reconstruct", recon_target="dense_model", checkpoint_blocks=True)

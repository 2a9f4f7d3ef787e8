"""OATS compress mode: SparseLowRankLinear, compress vs dense-sum logits, save/reload, config checks, plot."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict

from factored.module import SparseLowRankLinear, compressed_layers, load_compressed, save_compressed
from oats.config import ConfigError, resolve
from tests.conftest import tiny_model


def test_module_matches_dense_and_stores_only_nonzeros():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(24, 40, generator=g) * (torch.rand(24, 40, generator=g) < 0.3)
    U, V, b = torch.randn(24, 3, generator=g), torch.randn(3, 40, generator=g), torch.randn(24, generator=g)
    mod = SparseLowRankLinear.from_factors(S, U, V, b)
    x = torch.randn(2, 5, 40, generator=g)
    ref = F.linear(x, S + U @ V, b)
    assert torch.allclose(mod(x), ref, atol=1e-5)
    nnz = int((S != 0).sum())
    assert mod.values.numel() == nnz and mod.mask.dtype == torch.uint8 and tuple(mod.mask.shape) == (24, 8)
    assert mod.param_count() == nnz + U.numel() + V.numel()
    assert set(mod.state_dict()) == {"values", "mask", "U", "V", "bias"}  # no indices, nothing dense-shaped
    assert all(t.numel() < S.numel() for t in mod.state_dict().values())
    assert torch.equal(mod.sparse_weight().to_dense(), S) and torch.equal(mod.sparse_dense(), S)
    assert mod.row_offsets().tolist() == [0] + (S != 0).sum(1).cumsum(0).tolist()


def test_state_dict_of_the_csr_form_still_loads():
    """A layer saved as CSR (crow_indices, col_indices int32) loads into the bitmask layout."""
    g = torch.Generator().manual_seed(3)
    S = torch.randn(10, 45, generator=g) * (torch.rand(10, 45, generator=g) < 0.4)
    csr = S.to_sparse_csr()
    U, V = torch.randn(10, 2, generator=g), torch.randn(2, 45, generator=g)
    old = {"values": csr.values(), "crow_indices": csr.crow_indices(), "col_indices": csr.col_indices().to(torch.int32), "U": U, "V": V}
    mod = SparseLowRankLinear(45, 10, 2, csr.values().numel(), bias=False)
    mod.load_state_dict(old, strict=True)
    assert torch.equal(mod.sparse_dense(), S) and torch.allclose(mod.dense_weight(), S + U @ V)


def _cfg(**kw) -> ConfigDict:
    base = dict(model="tiny", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=4, svd="fast")
    return resolve({**base, **kw})


def _compress(model, cfg):
    from oats.compressor import compress_model
    from oats.pipeline import capture_inputs

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs = capture_inputs(model, ids, torch.device("cpu"), 2)
    return compress_model(model, inputs, cfg, torch.device("cpu"), [cfg.sparsity] * 2)


def test_compress_mode_gives_dense_sum_logits_and_round_trips(tmp_path):
    dense_model = tiny_model("llama")
    comp_model = copy.deepcopy(dense_model)
    rec_dense = _compress(dense_model, _cfg(compress=False))
    rec_comp = _compress(comp_model, _cfg(compress=True))
    layers = compressed_layers(comp_model)
    assert len(layers) == 14 and not compressed_layers(dense_model)  # 7 linears x 2 blocks
    assert [r["kept_params"] for r in rec_dense] == [r["kept_params"] for r in rec_comp]
    for r in rec_comp:
        assert r["sparsity"] == pytest.approx(r["achieved_compression"]) and r["sparsity"] >= 0.5
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ld, lc = dense_model(ids).logits, comp_model(ids).logits
    assert torch.allclose(ld, lc, atol=1e-4, rtol=1e-4)
    save_compressed(comp_model, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    assert set(compressed_layers(back)) == set(layers)
    saved, loaded = comp_model.state_dict(), back.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():  # the same tensors; the BLAS product may round differently at another address
        assert torch.allclose(back(ids).logits, lc, atol=1e-6, rtol=1e-6)


def test_config_rejects_impossible_nm_budget_and_layer_scope():
    with pytest.raises(ConfigError, match="'sparsity'.*2:4"):
        resolve(dict(model="m", method="oats", sparsity=0.6, sparsity_type="2:4"))
    with pytest.raises(ConfigError, match="mask_scope"):
        resolve(dict(model="m", method="oats", mask_scope="layer"))
    with pytest.raises(ConfigError, match="svd"):
        resolve(dict(model="m", method="oats", svd="lanczos"))
    assert resolve(dict(model="m", method="oats", weight_update="optima")).weight_update == "optima"  # OATS + OPTIMA
    assert resolve(dict(model="m", method="oats", sparsity=0.5, sparsity_type="2:8")).sparsity_type == "2:8"


def test_layer_plot_writes_file(tmp_path):
    from eval.report import plot_layers

    recs = [{"layer": f"{b}.{n}", "block": b, "sparsity": 0.5, "scaled_rel_error": 0.1 * (b + 1), "rank": 3} for b in range(2) for n in ("q", "k")]
    out = plot_layers({"layers": recs, "config": {"name": "t", "method": "oats", "sparsity": 0.5}}, tmp_path / "p.png")
    assert out.stat().st_size > 1000

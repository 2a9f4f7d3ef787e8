"""Forwards of SparseLowRankLinear: every representation equals the dense-merged forward; the measured
choice, its cache and record; the optional compiled bitmask kernel (skipped without a compiler)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from factored import forward as fw
from factored.kernels import BitmaskMatrix, available, dense_matmul, failure
from factored.module import SparseLowRankLinear, compressed_layers
from factored.module import set_module
from tests.conftest import tiny_model


def _layer(d_out=40, d_in=70, rank=3, density=0.4, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(d_out, d_in, generator=g) * (torch.rand(d_out, d_in, generator=g) < density)
    U, V = torch.randn(d_out, rank, generator=g) * 0.3, torch.randn(rank, d_in, generator=g) * 0.3
    b = torch.randn(d_out, generator=g) if bias else None
    return SparseLowRankLinear.from_factors(S, U, V, b, dtype=dtype).eval(), S, U, V, b


def _has_kernel():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return False
    return available()


needs_kernel = pytest.mark.skipif(not _has_kernel(), reason=f"bitmask kernel not compiled here ({failure()})")


@pytest.mark.parametrize("shape,rank,bias", [((40, 70), 3, True), ((64, 96), 0, False), ((33, 128), 5, False)])
def test_every_forward_equals_dense_merged_float32(shape, rank, bias):
    layer, S, U, V, b = _layer(*shape, rank=rank, bias=bias)
    ref_w = S + U @ V
    for rows in (1, 3, 17):
        x = torch.randn(rows, shape[1])
        ref = F.linear(x, ref_w, b)
        with torch.no_grad():
            merged = fw.run_forward(layer, x, "dense_merged")
            assert torch.allclose(merged, ref, atol=1e-5, rtol=1e-5)
            for impl in fw.available_forwards(layer, x):
                assert torch.allclose(fw.run_forward(layer, x, impl), merged, atol=1e-4, rtol=1e-4), impl
    x3 = torch.randn(2, 5, shape[1])  # leading dims are kept
    with torch.no_grad():
        for impl in fw.available_forwards(layer, x3):
            assert fw.run_forward(layer, x3, impl).shape == (2, 5, shape[0])


def test_every_forward_equals_dense_merged_bfloat16():
    layer, *_ = _layer(48, 96, rank=4, dtype=torch.bfloat16)
    x = torch.randn(2, 96).to(torch.bfloat16)
    with torch.no_grad():
        merged = fw.run_forward(layer, x, "dense_merged").float()
        for impl in fw.available_forwards(layer, x):
            out = fw.run_forward(layer, x, impl).float()
            assert torch.allclose(out, merged, atol=0.05 * merged.abs().max().item(), rtol=0.02), impl


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,density", [((37, 70), 0.5), ((64, 64), 0.05), ((5, 33), 1.0), ((8, 32), 0.0), ((576, 160), 0.3)])
def test_bitmask_kernel_matches_dense(dtype, shape, density):
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)).to(dtype)
    bm = BitmaskMatrix.from_dense(W)
    assert tuple(bm.mask.shape) == (shape[0], 4 * ((shape[1] + 31) // 32))
    for rows in (1, 2, 5):
        x = torch.randn(rows, shape[1], generator=g).to(dtype)
        ref = x.float() @ W.float().T
        out = bm.matmul(x)
        assert out.dtype == torch.float32 and out.shape == (rows, shape[0])
        assert torch.allclose(out, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(43, 576), (576, 43), (7, 5), (64, 96)])
def test_dense_kernel_matches_torch(dtype, shape):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(*shape, generator=g).to(dtype)
    for rows in (1, 3):
        x = torch.randn(rows, shape[1], generator=g).to(dtype)
        ref = x.float() @ W.float().T
        out = dense_matmul(W, x)
        assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


def test_choice_is_cached_per_key_and_recorded():
    fw.clear_calibration()
    a, *_ = _layer(40, 70, seed=0)
    b, *_ = _layer(40, 70, seed=1)  # same shape and density bucket: no new calibration
    c1 = fw.choose_forward(a, 1)
    n = len(fw.calibration_table())
    assert fw.choose_forward(b, 1) == c1 and len(fw.calibration_table()) == n
    fw.choose_forward(a, 300)
    table = fw.calibration_table()
    assert len(table) == n + 1 and {t["rows"] for t in table} >= {1, 1024}
    assert all(t["choice"] in t["seconds"] and t["choice"] in fw.CANDIDATES for t in table)
    json.dumps(table)
    assert fw.rows_bucket(1) == 1 and fw.rows_bucket(3) == 4 and fw.rows_bucket(512) == 1024
    assert fw.density_bucket(0.52) == 0.5
    # a calibration restricted to one candidate picks it
    assert fw.choose_forward(a, 1, candidates=("torch_csr",)) == "torch_csr"


def test_auto_forward_on_a_model_keeps_logits_and_records_choices():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    for i, (name, lin) in enumerate([(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]):
        W = lin.weight.detach()
        S = W * (torch.rand(W.shape, generator=g) < 0.5)
        r = (0, 2, 4)[i % 3]
        set_module(model, name, SparseLowRankLinear.from_factors(S, torch.randn(W.shape[0], r, generator=g) * 0.1,
                                                               torch.randn(r, W.shape[1], generator=g) * 0.1))
    ids = torch.randint(0, 128, (1, 9), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
    assert fw.install_auto_forward(model) == len(compressed_layers(model)) == 14
    with torch.no_grad():
        out = model(ids).logits  # prefill rows: 9
        one = model(ids[:, :1]).logits  # decode-shaped call: 1 row
        ref1 = None
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    rec = fw.forward_record(model)
    json.dumps(rec)
    assert set(rec["calls"]) <= set(fw.CANDIDATES) and sum(rec["calls"].values()) == 28
    assert all(set(v) == {"1", "16"} for v in rec["layers"].values()) and "rows<=1:" in rec["summary"]
    fw.remove_auto_forward(model)
    with torch.no_grad():
        ref1 = model(ids[:, :1]).logits
    assert torch.allclose(one, ref1, atol=1e-4, rtol=1e-4)
    assert all(not hasattr(m, "_oats_dense") and "forward" not in m.__dict__ for m in compressed_layers(model).values())
    # a fixed forward is used everywhere
    fw.install_auto_forward(model, fixed="dense_merged")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert set(fw.forward_record(model)["calls"]) == {"dense_merged"}
    fw.remove_auto_forward(model)


def test_training_mode_keeps_gradients():
    layer, *_ = _layer(16, 32)
    model = torch.nn.Sequential(layer)
    fw.install_auto_forward(model, fixed="dense_merged")
    layer.train()
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.values.grad is not None and layer.U.grad is not None
    fw.remove_auto_forward(model)


def test_auto_keeps_no_dense_copy_unless_allowed_and_times_best_dense():
    fw.clear_calibration()
    layer, *_ = _layer(48, 80, rank=2)
    model = torch.nn.Sequential(layer)
    fw.install_auto_forward(model)
    x = torch.randn(3, 80)
    with torch.no_grad():
        for rows in (1, 40):
            model(torch.randn(rows, 80))
        out = model(x)
    assert not hasattr(layer, "_oats_dense") and not set(layer._oats_choice.values()) & set(fw.DENSE_COPY)
    assert torch.allclose(out, F.linear(x, layer.dense_weight(), layer.bias), atol=1e-4, rtol=1e-4)
    table = fw.calibration_table()
    assert table and all("dense_merged" in t["seconds"] and t["best_dense_seconds"] == fw.best_dense(t["seconds"]) for t in table)
    fw.remove_auto_forward(model)
    fw.clear_calibration()
    fw.install_auto_forward(model, candidates=("dense_merged",), keep_dense=True)
    with torch.no_grad():
        model(x)
    assert hasattr(layer, "_oats_dense")  # allowed and chosen: the copy is kept
    fw.remove_auto_forward(model)


def test_calibrations_are_stored_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OATS_FORWARD_CACHE", raising=False)
    monkeypatch.setattr(fw, "_STORED", [])
    monkeypatch.setattr(fw, "_CACHE", {})
    layer, *_ = _layer(40, 70)
    first = fw.choose_forward(layer, 1)
    from factored import calibration

    assert calibration.path().is_file() and calibration.path().parent.parent == tmp_path
    monkeypatch.setattr(fw, "_STORED", [])  # a new process on the same machine
    monkeypatch.setattr(fw, "_CACHE", {})

    timed = []
    monkeypatch.setattr(fw, "_time", lambda fn, **k: timed.append(1) or 1.0)
    assert fw.choose_forward(layer, 1) == first and not timed
    monkeypatch.setenv("OATS_FORWARD_CACHE", "0")  # disabled: nothing read
    monkeypatch.setattr(fw, "_STORED", [])
    monkeypatch.setattr(fw, "_CACHE", {})
    fw.choose_forward(layer, 1)
    assert timed

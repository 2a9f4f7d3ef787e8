"""The bitmask layout (pure tensor functions) and the compiled bitmask kernel against the dense-merged forward:
random and SmolLM2 weights, every SmolLM2 linear shape, odd sizes, batch 1-8 (and past 8), float32 and
bfloat16, with and without the fused low-rank part, unstructured and 2:4 (the kernel's select path, also
with a few rows that are not 2:4). The kernel tests are skipped without a compiler."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from export.formats import pack_bitmask
from factored import bitmask as bm
from factored import forward as fw
from factored.kernels import available, failure, isa
from factored.module import SparseLowRankLinear

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down [out, in]
ODD_SHAPES = [(37, 70), (5, 33), (13, 45), (3, 17), (64, 96), (1, 1)]
ODD_SHAPES_24 = [(37, 68), (5, 4), (13, 44), (3, 20), (7, 100), (2, 36)]  # in % 4 == 0, not % 32 (a partial group)

needs_kernel = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")) or not available(),
                                  reason=f"kernel not compiled here ({failure()})")


def _sparse(shape, density, g, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)).to(dtype)


def test_layout_round_trips_and_matches_the_export_bitmask():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 70), (4, 64), (3, 1), (5, 32)]:
        S = _sparse(shape, 0.4, g)
        values, mask = bm.pack(S)
        assert mask.dtype == torch.uint8 and tuple(mask.shape) == (shape[0], bm.mask_bytes(shape[1]))
        assert torch.equal(bm.unpack_mask(mask, shape[1]), S != 0) and torch.equal(bm.to_dense(values, mask, shape[1]), S)
        assert torch.equal(bm.row_offsets(mask), torch.cat([torch.zeros(1, dtype=torch.int64), (S != 0).sum(1).cumsum(0)]))
        csr = S.to_sparse_csr()
        assert torch.equal(bm.from_csr(csr.crow_indices(), csr.col_indices(), shape), mask)
        if shape[1] % 32 == 0:  # rows need no padding: the mask bytes are the exported bitmask
            ev, em = pack_bitmask(S)
            assert torch.equal(torch.as_tensor(ev), values) and bytes(torch.as_tensor(em).numpy()) == bytes(mask.flatten().numpy())


def two_four(W, n=2, m=4):
    """W with the n largest of every m consecutive entries of a row kept (the rest exactly zero)."""
    g = W.abs().reshape(W.shape[0], -1, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(n, dim=-1).indices, True)
    return W * keep.reshape(W.shape)


def test_two_per_nibble_flags_exactly_the_2_4_rows():
    g = torch.Generator().manual_seed(0)
    for shape in [(9, 64), (5, 36), (4, 4), (6, 1536)]:
        S = two_four(torch.randn(*shape, generator=g))
        S[1, :] = 0  # no entries
        S[2, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 in one nibble
        if shape[1] > 4:
            S[3, -4:] = 0  # the last nibble empty
        _, mask = bm.pack(S)
        want = ((S != 0).reshape(shape[0], -1, 4).sum(-1) == 2).all(1)
        assert torch.equal(bm.two_per_nibble(mask, shape[1]), want) and not want[1:3].any() and want.sum() >= shape[0] - 3
        assert bool(want[3]) == (shape[1] == 4)
        layer = SparseLowRankLinear.from_factors(S, torch.zeros(shape[0], 0), torch.zeros(0, shape[1]))
        assert torch.equal(layer.two_four_rows(), want.to(torch.uint8))
        with torch.no_grad():
            layer.mask.zero_()  # the flags follow the mask
        assert layer.two_four_rows() is None
    for inp in (3, 70, 66):
        assert not bm.two_per_nibble(bm.pack(torch.ones(2, inp))[1], inp).any()


def _check(layer, x, dtype):
    """Kernel forward vs the dense-merged forward and a float64 reference of the stored tensors."""
    with torch.no_grad():
        out = fw.run_forward(layer, x, "bitmask_kernel")
        merged = fw.run_forward(layer, x, "dense_merged")
        W = layer.sparse_dense().double() + layer.U.double() @ layer.V.double()
        ref = F.linear(x.double(), W, None if layer.bias is None else layer.bias.double())
    assert out.dtype == x.dtype and out.shape == merged.shape
    scale = max(1.0, ref.abs().max().item())
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2  # bf16: the output's own rounding (2^-7 relative)
    assert (out.double() - ref).abs().max().item() <= tol * scale
    assert (out.double() - merged.double()).abs().max().item() <= 2 * tol * scale


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES + ODD_SHAPES)
def test_kernel_equals_dense_merged_random(dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    for density, rank, bias in [(0.5, 0, False), (0.05, 3, True), (1.0, 0, True), (0.0, 2, False), (0.3, 7, False)]:
        S = _sparse(shape, density, g)
        U, V = torch.randn(shape[0], rank, generator=g) * 0.2, torch.randn(rank, shape[1], generator=g) * 0.2
        b = torch.randn(shape[0], generator=g) if bias else None
        layer = SparseLowRankLinear.from_factors(S, U, V, b, dtype=dtype).eval()
        with torch.no_grad():  # the compiled scatter (densify, dense_merged) is exact
            assert torch.equal(layer.sparse_dense(), S.to(dtype))
        for rows in (1, 2, 3, 4, 5, 6, 7, 8) if density == 0.5 else (1, 8, 11):
            _check(layer, torch.randn(rows, shape[1], generator=g).to(dtype), dtype)


@needs_kernel
@pytest.mark.parametrize("pattern", ["oats", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_dense_merged_on_smollm2_weights(dtype, pattern, smollm2):
    from sparse_lowrank.common import oats_budget

    model, _ = smollm2
    block = model.model.layers[3]
    g = torch.Generator().manual_seed(0)
    lins = {"q": block.self_attn.q_proj, "k": block.self_attn.k_proj, "o": block.self_attn.o_proj,
            "up": block.mlp.up_proj, "down": block.mlp.down_proj}
    for name, lin in lins.items():
        W = lin.weight.detach().float()
        out, inp = W.shape
        budget = oats_budget(out, inp, 0.5, 0.3)
        if pattern == "2:4":  # (SmolLM2 holds exact zeros: a few rows are not 2:4 and take the expand path)
            S = two_four(W)
        else:
            keep = W.abs().topk(budget.keep_per_row, dim=1).indices
            S = torch.zeros_like(W).scatter_(1, keep, W.gather(1, keep))
        R = W - S  # the low-rank part: a truncated SVD of what S leaves out
        Uf, sv, Vh = torch.linalg.svd(R, full_matrices=False)
        U, V = Uf[:, :budget.rank] * sv[:budget.rank], Vh[:budget.rank]
        for rank_part in (False, True):
            layer = SparseLowRankLinear.from_factors(S, U if rank_part else U[:, :0], V if rank_part else V[:0], dtype=dtype).eval()
            if pattern == "2:4":
                assert int(layer.two_four_rows().sum()) >= 0.9 * out
            for rows in (1, 4, 8):
                _check(layer, torch.randn(rows, inp, generator=g).to(dtype), dtype)


@needs_kernel
def test_kernel_path_is_the_best_the_cpu_has():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    want = "avx2" if (" avx2" in flags and " fma" in flags) else "portable"
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2")):
        want = "avx512-vbmi2"
    if os.environ.get("OATS_KERNEL_ISA") in ("avx2", "portable"):
        want = os.environ["OATS_KERNEL_ISA"] if want != "portable" else "portable"
    assert isa() == want


PORTABLE_CHECK = """
import torch, torch.nn.functional as F
from factored.kernels import isa, bitmask_matmul, dense_matmul
from factored import bitmask as bm
assert isa() == "portable", isa()
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for shape, nm in (((37, 70), False), ((192, 576), False), ((3, 17), False), ((192, 576), True), ((13, 44), True)):
        S = (torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < 0.5))
        if nm:
            a = S.abs().reshape(shape[0], -1, 4) + torch.rand(shape[0], shape[1] // 4, 4, generator=g)
            S = torch.randn(*shape, generator=g) * torch.zeros_like(a, dtype=torch.bool).scatter_(2, a.topk(2, -1).indices, True).reshape(shape)
        S = S.to(dtype)
        U, V = torch.randn(shape[0], 3, generator=g).to(dtype), torch.randn(3, shape[1], generator=g).to(dtype)
        values, mask = bm.pack(S)
        regular = bm.two_per_nibble(mask, shape[1])
        assert bool(regular.all()) == nm
        for rows in (1, 5, 9):
            x = torch.randn(rows, shape[1], generator=g).to(dtype)
            ref = x.double() @ (S.double() + U.double() @ V.double()).T
            y = bitmask_matmul(values, bm.row_offsets(mask), mask, x, U, V, regular=regular if nm else None).double()
            assert (y - ref).abs().max() <= 1e-2 * max(1.0, ref.abs().max().item()), (dtype, shape, rows)
            d = dense_matmul(S, x).double()
            assert (d - x.double() @ S.double().T).abs().max() <= 1e-2 * max(1.0, d.abs().max().item())
print("ok")
"""


@needs_kernel
def test_portable_fallback_build_matches():
    """The plain C build (what a CPU without AVX2 gets), forced with OATS_KERNEL_ISA=portable; 2:4 rows flagged
    are read the one way it has."""
    env = {**os.environ, "OATS_KERNEL_ISA": "portable", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@needs_kernel
def test_avx2_build_on_an_avx512_cpu_passes_the_kernel_tests():
    """Where the native build is the AVX-512 path, the AVX2 build (what an AVX2-only CPU gets, with the 2:4
    select path) is built with OATS_KERNEL_ISA=avx2 and runs this file's kernel checks."""
    if isa() != "avx512-vbmi2":
        pytest.skip(f"the native kernel path is {isa()}, which this file's other tests check")
    env = {**os.environ, "OATS_KERNEL_ISA": "avx2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                        "-k", "kernel and not avx2_build and not portable"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SMOLLM2_SHAPES + ODD_SHAPES_24)
def test_kernel_2_4_path_equals_dense_merged_random(dtype, shape):
    """2:4 layers (every row, then all but a few) through the select path: batch 1-8 and 11 (the select
    path takes up to 4 rows per pass; 11 = 8 by expansion + 3 by selection), with and without U, V."""
    g = torch.Generator().manual_seed(hash(shape) % 1000 + 1)
    for irregular, rank, bias in [(False, 0, False), (True, 3, True), (False, 5, False), (True, 0, True)]:
        S = two_four(torch.randn(*shape, generator=g))
        if irregular:  # a kept entry exactly zero: that row is read by the expand path
            S[:: 3, :4] = 0
        U, V = torch.randn(shape[0], rank, generator=g) * 0.2, torch.randn(rank, shape[1], generator=g) * 0.2
        b = torch.randn(shape[0], generator=g) if bias else None
        layer = SparseLowRankLinear.from_factors(S, U, V, b, dtype=dtype).eval()
        rows24 = layer.two_four_rows()
        assert rows24 is not None and int(rows24.sum()) == shape[0] - (len(range(0, shape[0], 3)) if irregular else 0)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11):
            _check(layer, torch.randn(rows, shape[1], generator=g).to(dtype), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_2_4_path_is_taken_and_reads_every_pattern(dtype):
    """The select path is what runs for flagged rows (a row flagged falsely gives a wrong product up to 4
    input rows, a right one past them, where the kernel expands), the forward passes the layer's flags, and
    every 2:4 byte pattern and 1:2 rows give the dense product. Only the AVX2 path selects: the AVX-512 and
    portable paths expand every row, so a false flag changes nothing there."""
    from factored.kernels import bitmask_matmul

    selects = isa() == "avx2"

    g = torch.Generator().manual_seed(7)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for inp in (64, 36):
        keep = torch.zeros(36, inp, dtype=torch.bool)  # row r: the pair r % 6 in even nibbles, r // 6 in odd ones
        for r in range(36):
            for q in range(inp // 4):
                keep[r, [4 * q + j for j in pairs[(r // 6) if q % 2 else (r % 6)]]] = True
        for S in (torch.randn(36, inp, generator=g) * keep, two_four(torch.randn(36, inp, generator=g), 1, 2)):
            S = S.to(dtype)
            values, mask = bm.pack(S)
            rows = bm.two_per_nibble(mask, inp)
            assert bool(rows.all())
            x = torch.randn(8, inp, generator=g).to(dtype)
            ref = x.double() @ S.double().T
            for b in (1, 2, 3, 4, 8):
                y = bitmask_matmul(values, bm.row_offsets(mask), mask, x[:b], regular=rows).double()
                assert (y - ref[:b]).abs().max().item() <= 1e-2 * max(1.0, ref.abs().max().item()), (inp, b)
        S = (torch.randn(36, inp, generator=g) * keep).to(dtype)
        S[:, :3] = 1.0  # every row's first nibble holds 3 or more entries: not 2:4
        layer = SparseLowRankLinear.from_factors(S, torch.zeros(36, 0), torch.zeros(0, inp), dtype=dtype).eval()
        assert layer.two_four_rows() is None
        x = torch.randn(8, inp, generator=g).to(dtype)
        with torch.no_grad():
            ref = F.linear(x.double(), S.double())
            lie = torch.ones(36, dtype=torch.uint8)
            for b, wrong in ((1, True), (4, True), (8, False)):
                y = bitmask_matmul(layer.values, layer.row_offsets(), layer.mask, x[:b], regular=lie).double()
                assert ((y - ref[:b]).abs().max().item() > 0.1) == (wrong and selects), b
            layer.__dict__["two_four_rows"] = lambda: lie  # the forward reads the layer's flags
            y = fw.run_forward(layer, x[:1], "bitmask_kernel").double()
            assert ((y - ref[:1]).abs().max().item() > 0.1) == selects

"""OATS against a reference loop written from the paper's public code: a full thin SVD of ``W_s - S``
with the singular values past r zeroed, ``L = U diag(s) V^T`` rebuilt from all factors, and a stable
full sort of every row of ``|W_s - L|`` to zero its smallest entries. ``decompose(svd="exact")`` must
reach the same objective and the same masks on matrices with a planted sparse + low-rank structure.

``bench/bench_oats.py`` times :func:`reference_loop` next to the exact and fast paths.
"""
from __future__ import annotations

import pytest
import torch

from sparse_lowrank.common import oats_budget
from sparse_lowrank.decompose import decompose, safe_second_moment, scaled_objective


@torch.no_grad()
def reference_loop(W: torch.Tensor, D: torch.Tensor, rank: int, keep_per_row: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference algorithm: W [m, n], D [n] -> (sparse, U, V) with W ~ sparse + U V (unstructured only)."""
    s = safe_second_moment(D).sqrt()
    Ws = W * s
    sparse = torch.zeros_like(Ws)
    prune = W.shape[1] - keep_per_row
    for _ in range(iters):
        U, sig, Vh = torch.linalg.svd(Ws - sparse, full_matrices=False)
        sig[rank:] = 0
        low_rank = U @ torch.diag(sig) @ Vh
        sparse = Ws - low_rank
        order = torch.sort(sparse.abs(), dim=-1, stable=True).indices
        drop = torch.zeros_like(sparse, dtype=torch.bool).scatter_(1, order[:, :prune], True)
        sparse[drop] = 0
    root = sig[:rank].sqrt()
    return sparse / s, U[:, :rank] * root, (root.unsqueeze(-1) * Vh[:rank]) / s


NOISE = 0.01


def planted(m: int, n: int, rank: int, keep: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, D) float64: in scaled coordinates W diag(sqrt D) = rank-``rank`` part + ``keep`` large entries
    per row + ``NOISE`` Gaussian noise; D spans three decades, as calibration moments do."""
    g = torch.Generator().manual_seed(seed)
    D = 10 ** (3 * torch.rand(n, generator=g, dtype=torch.float64) - 1.5)
    low = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64) / rank**0.5
    cols = torch.rand(m, n, generator=g).argsort(dim=1)[:, :keep]
    big = torch.zeros(m, n, dtype=torch.float64).scatter_(1, cols, 4 * torch.randn(m, keep, generator=g, dtype=torch.float64).sign()
                                                          * (1 + torch.rand(m, keep, generator=g, dtype=torch.float64)))
    Ws = low + big + NOISE * torch.randn(m, n, generator=g, dtype=torch.float64)
    return Ws / D.sqrt(), D


CASES = [(48, 64, 0), (64, 40, 1), (96, 96, 2)]


@pytest.mark.parametrize("m,n,seed", CASES)
@pytest.mark.parametrize("iters", [1, 4, 10])
def test_exact_path_matches_the_reference_loop(m, n, seed, iters):
    b = oats_budget(m, n, 0.5, 0.3)
    W, D = planted(m, n, b.rank, b.keep_per_row // 3, seed)
    ref_sparse, ref_U, ref_V = reference_loop(W, D, b.rank, b.keep_per_row, iters)
    res = decompose(W, D, b.rank, b.keep_per_row, iters, svd="exact")
    assert res.sparse.dtype == torch.float64
    assert torch.equal(res.sparse != 0, ref_sparse != 0)
    assert ((res.sparse != 0).sum(dim=1) == b.keep_per_row).all()
    ref_obj = scaled_objective(W, D, ref_sparse, ref_U, ref_V)
    obj = scaled_objective(W, D, res.sparse, res.U, res.V)
    assert obj == pytest.approx(ref_obj, rel=1e-5, abs=1e-12)
    assert res.objective[-1] == pytest.approx(ref_obj, rel=1e-5)
    torch.testing.assert_close(res.U @ res.V, ref_U @ ref_V, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.sparse, ref_sparse, rtol=1e-6, atol=1e-8)


def test_both_loops_find_the_planted_structure():
    """A planted split (a third of the kept budget per row, the full rank) is found down to the noise
    level, with an objective that never rises; the reference loop ends at the same objective."""
    m, n = 64, 96
    b = oats_budget(m, n, 0.5, 0.3)
    W, D = planted(m, n, b.rank, b.keep_per_row // 3, seed=0)
    noise_level = NOISE * (m * n) ** 0.5 / float((W * D.sqrt()).norm())
    res = decompose(W, D, b.rank, b.keep_per_row, 30, svd="exact")
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] < 2 * noise_level < 0.1 * res.objective[0]
    assert scaled_objective(W, D, *reference_loop(W, D, b.rank, b.keep_per_row, 30)) == pytest.approx(res.objective[-1], rel=1e-5)

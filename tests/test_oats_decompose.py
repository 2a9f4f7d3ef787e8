"""OATS math: the budget split, hard thresholding, alternating thresholding (exact and fast paths)."""
from __future__ import annotations

import itertools

import pytest
import torch

from sparse_lowrank.common import OatsBudgetError, keep_per_row_for, oats_budget
from sparse_lowrank.decompose import (
    _LowRank,
    _RowThreshold,
    _top_singular,
    alternating_thresholding,
    decompose,
    hard_threshold,
    safe_second_moment,
    scaled_objective,
)
from oats.interface import Budget, InputStats
from sparse_lowrank.oats import compress_weight

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (7, 13), (64, 64), (4096, 14336), (1, 8)]


def _brute_rank_keep(m: int, n: int, p: int, q: int) -> tuple[int, int]:
    """Largest r with r(m+n) <= kappa(1-rho)mn and largest k with k <= (1-kappa)(1-rho)n, rho = p/100,
    kappa = q/100, by integer search (no floating point)."""
    r = 0
    while (r + 1) * (m + n) * 10000 <= q * (100 - p) * m * n:
        r += 1
    k = 0
    while (k + 1) * 10000 <= (100 - q) * (100 - p) * n:
        k += 1
    return r, k


@pytest.mark.parametrize("m,n", SHAPES)
def test_budget_unstructured_exact(m, n):
    for p, q in itertools.product([0, 10, 25, 30, 50, 60, 70, 90, 99], [0, 10, 20, 25, 30, 50, 70, 90]):
        b = oats_budget(m, n, p / 100, q / 100)
        r, k = _brute_rank_keep(m, n, p, q)
        assert (b.rank, b.keep_per_row) == (min(r, m, n), k), (m, n, p, q)
        assert b.kept_params * 100 <= (100 - p) * m * n  # never above the budget
        assert b.achieved_compression >= p / 100 - 1e-12
        assert b.kept_params == m * k + b.rank * (m + n)


@pytest.mark.parametrize("m,n", [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64)])
def test_budget_nm_exact_and_rejects_impossible(m, n):
    for (nn_, mm), p in itertools.product([(2, 4), (2, 8), (4, 8), (1, 4)], range(0, 100, 5)):
        allowed = (100 - p) * m * n // 100
        nnz = m * n * nn_ // mm
        if nnz > allowed:
            with pytest.raises(OatsBudgetError, match="sparsity"):
                oats_budget(m, n, p / 100, 0.3, (nn_, mm))
            continue
        b = oats_budget(m, n, p / 100, 0.3, (nn_, mm))
        r = 0
        while nnz + (r + 1) * (m + n) <= allowed:
            r += 1
        assert b.nonzeros == nnz and b.keep_per_row == n * nn_ // mm
        assert b.rank == min(r, m, n) and b.kept_params <= allowed


def test_budget_nm_needs_divisible_input():
    with pytest.raises(OatsBudgetError, match="multiple of M"):
        oats_budget(8, 10, 0.5, 0.3, (2, 4))


def test_keep_per_row_is_exact_decimal():
    assert keep_per_row_for(576, 0.65) == 201  # (1 - 0.65) * 576 = 201.6
    assert keep_per_row_for(576, 0.75) == 144
    assert keep_per_row_for(100, 0.7) == 30  # 0.3 * 100 is 30.000000000000004 in floats; exact here


def test_hard_threshold_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 40, generator=g, dtype=torch.float64)
    for k in [0, 1, 7, 20, 39, 40]:
        out = hard_threshold(x, k)
        for i in range(30):
            order = sorted(range(40), key=lambda j: -abs(float(x[i, j])))
            ref = torch.zeros(40, dtype=torch.float64)
            ref[order[:k]] = x[i, order[:k]]
            assert torch.equal(out[i], ref)


def test_hard_threshold_exact_count_with_ties_and_nm():
    x = torch.zeros(5, 16)
    x[:, :3] = 1.0  # ties everywhere: 13 zeros, 3 ones
    out = hard_threshold(x, 6)
    assert ((out != 0).sum(1) == 3).all()  # all ones kept...
    # ...and the count of *selected* entries is exact even among tied zeros: check via a non-zero tie
    y = torch.ones(4, 12)
    assert ((hard_threshold(y, 5) != 0).sum(1) == 5).all()
    z = torch.randn(6, 16)
    nm = hard_threshold(z, 0, (2, 4))
    groups = (nm != 0).reshape(6, 4, 4).sum(-1)
    assert (groups == 2).all()
    ref = z.reshape(6, 4, 4)
    kept = nm.reshape(6, 4, 4)
    for i, j in itertools.product(range(6), range(4)):
        top = ref[i, j].abs().topk(2).indices
        assert set(kept[i, j].nonzero().flatten().tolist()) == set(top.tolist())


def test_warm_row_threshold_matches_topk_across_iterations():
    g = torch.Generator().manual_seed(1)
    th = _RowThreshold(9)
    x = torch.randn(1, 50, 30, generator=g)
    for step in range(6):
        x = x + (0.3 if step < 2 else 1e-4) * torch.randn(1, 50, 30, generator=g)
        assert torch.equal(th(x), hard_threshold(x, 9))


def _is_topk_set(x: torch.Tensor, out: torch.Tensor, k: int) -> bool:
    """out keeps x's values on exactly k entries per row, none smaller in |x| than any dropped one."""
    kept = out != 0
    if not bool((kept.sum(-1) == k).all()) or not torch.equal(out[kept], x[kept]):
        return False
    a = x.abs()
    lo = torch.where(kept, a, torch.inf).amin(-1)
    hi = torch.where(kept, -torch.inf, a).amax(-1)
    return bool((lo >= hi).all())


def test_warm_row_threshold_with_ties_and_large_shifts():
    """Integer magnitudes (ties at the cut in most rows) and jumps that move the k-th place by more
    than ``max_shift``: every call still keeps a top-k set of exactly k entries per row."""
    g = torch.Generator().manual_seed(3)
    th = _RowThreshold(11, max_shift=4)
    for step in range(8):
        mag = torch.randint(1, 6, (2, 40, 30), generator=g).float()
        sign = torch.randint(0, 2, (2, 40, 30), generator=g).float() * 2 - 1
        x = mag * sign if step % 2 else mag * sign + 0.01 * torch.randn(2, 40, 30, generator=g)
        assert _is_topk_set(x, th(x), 11), step


def test_warm_row_threshold_small_shifts_use_the_cut():
    """Rows whose count moves by a few entries are fixed without a full topk (same answer as topk)."""
    g = torch.Generator().manual_seed(5)
    th = _RowThreshold(40)
    x = torch.randn(1, 64, 120, generator=g)
    assert torch.equal(th(x), hard_threshold(x, 40))
    for _ in range(5):
        x = x + 0.02 * torch.randn(1, 64, 120, generator=g)
        assert torch.equal(th(x), hard_threshold(x, 40))
    assert th.topk_rows == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warm_row_threshold_planted_shifts_every_branch(dtype):
    """Rows whose kept count is off by a planted d (row maxima for |d| <= 3, one topk of |d| + 1 per
    bucket up to max_shift, a full topk beyond): every row keeps exactly the brute-force top-k set,
    and only the rows past max_shift need a full topk."""
    g = torch.Generator().manual_seed(11)
    k, n = 20, 64
    shifts = [0, 1, -1, 2, -2, 3, -3, 4, -4, 7, -8, 9, -12, 16, -16, 17, -19, 30]
    x = torch.randn(len(shifts), n, generator=g, dtype=dtype)
    th = _RowThreshold(k, max_shift=16)
    assert torch.equal(th(x.unsqueeze(0))[0], hard_threshold(x, k))
    # plant each row's cut so that exactly k + d entries clear it
    vals = x.abs().sort(-1, descending=True).values
    for i, d in enumerate(shifts):
        th.cut[i] = (vals[i, k + d - 1] + vals[i, k + d]) / 2
    assert bool(((x.abs() >= th.cut).sum(-1) - k == torch.tensor(shifts)).all())
    out = th(x.unsqueeze(0))[0]
    assert torch.equal(out, hard_threshold(x, k))
    assert th.topk_rows == sum(abs(d) > 16 for d in shifts)
    # the moved cuts lie midway between the k-th and (k+1)-th largest |x|
    assert torch.allclose(th.cut.squeeze(-1), (vals[:, k - 1] + vals[:, k]) / 2)


@pytest.mark.parametrize("shape", [(300, 90), (90, 300)])
def test_top_singular_matches_float64_svd(shape):
    """Iteration 0's top-l triplets from the Gram's eigenvectors: singular values and the rank-l
    approximation agree with a float64 thin SVD (tall and wide); a weight of lower rank than l
    gets zero vectors, not NaN."""
    g = torch.Generator().manual_seed(12)
    A = (torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)).unsqueeze(0)
    U, s, Vh = _top_singular(A.float(), 20)
    U0, s0, Vh0 = torch.linalg.svd(A, full_matrices=False)
    assert torch.allclose(s.double(), s0[..., :20], rtol=1e-5)
    L = (U.double() * s.double().unsqueeze(-2)) @ Vh.double()
    L0 = (U0[..., :20] * s0[..., None, :20]) @ Vh0[..., :20, :]
    assert float((L - L0).norm() / L0.norm()) < 1e-5
    assert torch.allclose(Vh.double() @ Vh.double().mT, torch.eye(20, dtype=torch.float64), atol=1e-5)
    low = (torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)).unsqueeze(0)
    U, s, Vh = _top_singular(low, 8)
    assert bool(torch.isfinite(U).all() and torch.isfinite(Vh).all())
    L = (U * s.unsqueeze(-2)) @ Vh
    assert float((L - low).norm() / low.norm()) < 1e-5


def test_fast_path_on_rank_deficient_input():
    """W of exact rank 3 with a rank-6 budget: the subspace basis is rank deficient (Cholesky QR fails
    over), the fast path falls back to Householder QR and matches the exact path."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(60, 3, generator=g) @ torch.randn(3, 80, generator=g)
    D = torch.rand(80, generator=g) + 0.5
    ex = decompose(W, D, 6, 30, 10, svd="exact")
    fa = decompose(W, D, 6, 30, 10, svd="fast", oversample=4)
    assert torch.isfinite(fa.U).all() and torch.isfinite(fa.V).all()
    oe, of = scaled_objective(W, D, ex.sparse, ex.U, ex.V), scaled_objective(W, D, fa.sparse, fa.U, fa.V)
    assert of <= oe * 1.01 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_on_exactly_low_rank_and_zero_weights(dtype):
    """Rank 3 inside zeros with a rank-5/8 budget: Ritz values vanish exactly (no NaN from dividing by
    them, no eigh failure) and the answer matches the exact path; an all-zero weight stays zero."""
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(40, 30, dtype=dtype)
    W[:3, :3] = torch.randn(3, 3, generator=g, dtype=dtype)
    D = torch.rand(30, generator=g, dtype=dtype) + 0.5
    for r in (5, 8):
        fa = decompose(W, D, r, 2, 6, svd="fast", oversample=4)
        ex = decompose(W, D, r, 2, 6, svd="exact")
        assert torch.isfinite(fa.U).all() and torch.isfinite(fa.V).all() and torch.isfinite(fa.sparse).all()
        err = float((fa.sparse + fa.U @ fa.V - ex.sparse - ex.U @ ex.V).abs().max())
        assert err < 100 * torch.finfo(dtype).eps * float(W.abs().max())
    Z = decompose(torch.zeros(20, 16, dtype=dtype), D[:16], 3, 4, 4, svd="fast", oversample=2)
    assert float((Z.U @ Z.V).abs().max()) == 0.0 and float(Z.sparse.abs().max()) == 0.0


@pytest.mark.parametrize("shape", [(150, 90), (90, 150)])
def test_warm_low_rank_step_matches_float64_svd(shape):
    """After a perturbation, the warm-started Ritz steps give the best rank-r approximation of the new
    matrix (float64 SVD reference) to the requested residual tolerance, on tall and wide matrices."""
    g = torch.Generator().manual_seed(11)
    m, n = shape
    U0, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    A = (U0[:, :k] * 0.93 ** torch.arange(k, dtype=torch.float64)) @ V0[:, :k].T
    r = 12
    step = _LowRank(r, "fast", oversample=8, tol=1e-8, max_steps=50)
    step(A.unsqueeze(0))  # cold start: one SVD
    A2 = A + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64)
    U, sig, Vh = step(A2.unsqueeze(0))
    L = (U[0] * sig[0]) @ Vh[0]
    Ue, se, Vhe = torch.linalg.svd(A2)
    Le = (Ue[:, :r] * se[:r]) @ Vhe[:r]
    assert step.steps[-1] >= 2
    torch.testing.assert_close(sig[0], se[:r], rtol=1e-9, atol=1e-12)
    assert float((L - Le).norm() / (A2 - Le).norm()) < 1e-6
    torch.testing.assert_close(U[0].T @ U[0], torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)


def test_svd_tol_default_is_one_number():
    """The config key's default and the pure function's default are the same tolerance."""
    from sparse_lowrank.oats import KEYS
    from sparse_lowrank.decompose import SVD_TOL

    assert KEYS["svd_tol"].default == SVD_TOL


def test_safe_second_moment_floors_zero_and_denormal():
    d = torch.tensor([0.0, 1e-45, 1.0, 4.0])
    s = safe_second_moment(d)
    assert (s > 0).all() and torch.isfinite(1 / s.sqrt()).all()
    assert s[2] == 1.0 and s[3] == 4.0 and s[0] == pytest.approx(4e-12)


def _planted(m, n, r, k, seed):
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64) / r**0.5
    S0 = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        idx = torch.randperm(n, generator=g)[:k]
        S0[i, idx] = (3 + torch.rand(k, generator=g, dtype=torch.float64)) * torch.sign(torch.randn(k, generator=g, dtype=torch.float64))
    D = 0.1 + torch.rand(n, generator=g, dtype=torch.float64) * 4  # second moments
    s = D.sqrt()
    return (L0 + S0) / s, D, S0 / s, L0 / s  # W, D, planted sparse and low rank in original coordinates


@pytest.mark.parametrize("svd", ["exact", "fast"])
def test_planted_sparse_plus_low_rank_is_recovered(svd):
    m, n, r, k = 120, 160, 4, 6
    W, D, S0, L0 = _planted(m, n, r, k, seed=3)
    S, U, V = alternating_thresholding(W, D, r, 1 - k / n, 60, svd=svd)
    assert S.dtype == torch.float64 and U.shape == (m, r) and V.shape == (r, n)
    assert ((S != 0).sum(1) == k).all()
    assert (S - S0).norm() / S0.norm() < 1e-6
    assert (U @ V - L0).norm() / L0.norm() < 1e-6
    assert torch.equal(S != 0, S0 != 0)  # the support itself


def test_objective_never_increases_in_exact_mode():
    g = torch.Generator().manual_seed(5)
    for m, n in [(40, 60), (60, 40), (32, 32)]:
        W = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.rand(1, n, generator=g, dtype=torch.float64) * 3
        D = torch.rand(n, generator=g, dtype=torch.float64) + 0.01
        b = oats_budget(m, n, 0.5, 0.3)
        res = decompose(W, D, b.rank, b.keep_per_row, 30, svd="exact")
        obj = torch.tensor(res.objective)
        assert (obj[1:] <= obj[:-1] * (1 + 1e-12)).all(), obj
        assert obj[-1] < obj[0]  # it did something
        assert scaled_objective(W, D, res.sparse, res.U, res.V) == pytest.approx(res.objective[-1], rel=1e-9)


def test_each_half_step_is_the_exact_minimiser_brute_force():
    """Alternating thresholding is a local method (on random 4x5 matrices it can land well above the
    global optimum), so what is checked is that both half-steps solve their subproblem exactly: given
    the final L, no row-wise support of k entries beats the chosen S (all C(n, k) supports enumerated
    per row); given the final S, ||W_s - S - L||^2 equals the Eckart-Young bound, the sum of the tail
    squared singular values of W_s - S (numpy float64 SVD)."""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    m, n, r, k = 6, 7, 2, 3
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    D = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    s = D.sqrt()
    res = decompose(W, D, r, k, 25, svd="exact")
    Ws, S, L = (W * s).numpy(), (res.sparse * s).numpy(), ((res.U @ res.V) * s).numpy()
    R = Ws - L
    for i in range(m):
        best = min(float(np.sum(np.delete(R[i], list(c)) ** 2)) for c in itertools.combinations(range(n), k))
        assert float(np.sum((R[i] - S[i]) ** 2)) == pytest.approx(best, rel=1e-12, abs=1e-14)
        assert np.count_nonzero(S[i]) == k
    # L is the last low-rank step, fitted to W_s - S_prev; refit check: the final objective is at least
    # the Eckart-Young bound for the final S, and the bound for the previous S was attained exactly.
    sv = np.linalg.svd(Ws - S, compute_uv=False)
    assert float(np.sum((Ws - S - L) ** 2)) >= float(np.sum(sv[r:] ** 2)) * (1 - 1e-12)
    one_more = decompose(W, D, r, k, 26, svd="exact")
    L2 = ((one_more.U @ one_more.V) * s).numpy()
    assert float(np.sum((Ws - S - L2) ** 2)) == pytest.approx(float(np.sum(sv[r:] ** 2)), rel=1e-10)


@pytest.mark.parametrize("shape", [(576, 1536), (192, 576)])
def test_fast_matches_exact_objective_on_real_shapes(shape):
    m, n = shape
    g = torch.Generator().manual_seed(7)
    # a weight-like spectrum: a few strong directions on top of noise, and outlier input features
    W = torch.randn(m, n, generator=g) * 0.02 + (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) * 0.01
    D = torch.rand(n, generator=g) ** 4 * 10
    D[torch.randperm(n, generator=g)[:6]] *= 100  # outlier features
    b = oats_budget(m, n, 0.5, 0.3)
    ex = decompose(W, D, b.rank, b.keep_per_row, 12, svd="exact")
    fa = decompose(W, D, b.rank, b.keep_per_row, 12, svd="fast")
    oe = scaled_objective(W, D, ex.sparse, ex.U, ex.V)
    of = scaled_objective(W, D, fa.sparse, fa.U, fa.V)
    assert abs(of - oe) / oe < 0.01
    assert ((fa.sparse != 0).sum(1) == b.keep_per_row).all()


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 48, 64, generator=g, dtype=torch.float64)
    D = torch.rand(3, 64, generator=g, dtype=torch.float64) + 0.1
    res = decompose(W, D, 5, 20, 10, svd="exact")
    for i in range(3):
        one = decompose(W[i], D[i], 5, 20, 10, svd="exact")
        assert torch.allclose(res.sparse[i], one.sparse, atol=1e-10)
        assert torch.allclose(res.U[i] @ res.V[i], one.U @ one.V, atol=1e-10)


def test_batched_fast_path_matches_one_by_one():
    """Same-shape matrices batched through the fast path (shared step count, per-matrix cuts)."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(3, 96, 64, generator=g) + (torch.randn(3, 96, 4, generator=g) @ torch.randn(3, 4, 64, generator=g))
    D = torch.rand(3, 64, generator=g) + 0.1
    res = decompose(W, D, 6, 24, 15, svd="fast")
    assert ((res.sparse != 0).sum(-1) == 24).all()
    for i in range(3):
        one = decompose(W[i], D[i], 6, 24, 15, svd="fast")
        ob = scaled_objective(W[i], D[i], res.sparse[i], res.U[i], res.V[i])
        oo = scaled_objective(W[i], D[i], one.sparse, one.U, one.V)
        assert abs(ob - oo) / oo < 0.01


def test_zero_second_moments_stay_finite():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 48, generator=g)
    D = torch.rand(48, generator=g)
    D[:5] = 0.0  # inputs that never fire
    for svd in ("exact", "fast"):
        S, U, V = alternating_thresholding(W, D, 4, 0.6, 5, svd=svd)
        assert torch.isfinite(S).all() and torch.isfinite(U @ V).all()
        assert (U @ V).abs().max() < 10 * W.abs().max()


def test_method_counts_and_nm_pattern():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 96, generator=g)
    stats = InputStats(sq_norms=torch.rand(96, generator=g) * 50 + 1, n_tokens=50)
    cfg = {"rank_ratio": 0.3, "num_iters": 5, "svd": "fast"}
    cw = compress_weight(W, stats, Budget(0.5), cfg)
    b = oats_budget(64, 96, 0.5, 0.3)
    assert cw.param_count() == b.kept_params == cw.info["kept_params"] <= 0.5 * 64 * 96
    assert cw.info["rank"] == b.rank == cw.U.shape[1] and cw.info["nonzeros"] == 64 * b.keep_per_row
    cw = compress_weight(W, stats, Budget(0.4, nm=(2, 8)), cfg)
    assert ((cw.sparse != 0).reshape(64, 12, 8).sum(-1) == 2).all()
    b = oats_budget(64, 96, 0.4, 0.3, (2, 8))
    assert cw.info["rank"] == b.rank > 0 and cw.info["achieved_compression"] == pytest.approx(b.achieved_compression)
    assert cw.info["achieved_compression"] >= 0.4

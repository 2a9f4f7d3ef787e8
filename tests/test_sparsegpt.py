"""SparseGPT: identity at 0%, OBS updates against a float64 least-squares solve, exact counts,
N:M, lower output error than Wanda/magnitude on correlated inputs, dead inputs, damping recovery."""
import logging

import pytest
import torch

from baselines.magnitude import compress_weight as magnitude_compress
from baselines.sparsegpt import compress_weight, hessian_inverse_factor, sparsegpt_prune
from baselines.wanda import compress_weight as wanda_compress
from oats.interface import Budget, InputStats


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens with strongly correlated features: a low-dimensional signal mixed into d dimensions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d // 4, generator=g)
    A = torch.randn(d // 4, d, generator=g)
    return Z @ A + 0.1 * torch.randn(n, d, generator=g) + torch.randn(d, generator=g)


def stats_of(X: torch.Tensor) -> InputStats:
    Xd = X.double()
    return InputStats(sq_norms=(Xd**2).sum(0).float(), n_tokens=X.shape[0], gram=(Xd.T @ Xd).float())


def test_all_ones_mask_at_zero_sparsity_leaves_w_unchanged():
    torch.manual_seed(0)
    W, X = torch.randn(12, 40), correlated_inputs(200, 40)
    H = 2 * X.double().T @ X.double() / 200
    out, mask, _ = sparsegpt_prune(W, H, 0.0, mask=torch.ones(12, 40, dtype=torch.bool), blocksize=16)
    assert torch.equal(out, W) and mask.all()
    out, mask, _ = sparsegpt_prune(W, H, 0.0, blocksize=16)
    assert torch.equal(out, W) and mask.all()


def test_hessian_inverse_factor_matches_dense_inverse():
    X = correlated_inputs(300, 24).double()
    H = X.T @ X
    U, info = hessian_inverse_factor(H, 0.01)
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)
    assert torch.equal(U, torch.triu(U)) and info["damp_retries"] == 0


def test_prefix_masks_give_the_least_squares_optimum():
    """With every row's pruned weights a prefix of its columns, the sequential OBS sweep is the exact
    minimiser of (w - w_hat)^T H (w - w_hat) with those weights zero: w_K + H_KK^-1 H_KP w_P (float64)."""
    torch.manual_seed(1)
    d_out, d_in, percdamp = 6, 30, 0.01
    W, X = torch.randn(d_out, d_in, dtype=torch.float64), correlated_inputs(400, d_in).double()
    H = X.T @ X
    mask = torch.ones(d_out, d_in, dtype=torch.bool)
    for i, p in enumerate([0, 3, 7, 12, 20, 29]):
        mask[i, :p] = False
    out, _, _ = sparsegpt_prune(W.float(), H, 0.0, mask=mask, blocksize=8, percdamp=percdamp)
    Hd = H + percdamp * torch.diagonal(H).mean() * torch.eye(d_in, dtype=torch.float64)
    for i in range(d_out):
        K, P = mask[i], ~mask[i]
        ref = torch.zeros(d_in, dtype=torch.float64)
        ref[K] = W[i, K] + torch.linalg.solve(Hd[K][:, K], Hd[K][:, P] @ W[i, P])
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_output_error_below_wanda_and_magnitude_on_correlated_inputs(sparsity):
    torch.manual_seed(2)
    W, X = torch.randn(48, 64), correlated_inputs(512, 64, seed=3)
    st = stats_of(X)
    err = lambda Wh: float((X.double() @ (W.double() - Wh.double()).T).norm())  # noqa: E731
    e_sgpt = err(compress_weight(W, st, Budget(sparsity)).dense)
    e_wanda = err(wanda_compress(W, st, Budget(sparsity)).dense)
    e_mag = err(magnitude_compress(W, None, Budget(sparsity)).dense)
    assert e_sgpt < 0.8 * e_wanda and e_sgpt < 0.8 * e_mag, (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("d_in, blocksize", [(64, 128), (80, 32), (77, 16)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.93])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_exact_counts_unstructured(d_in, blocksize, sparsity, scope):
    torch.manual_seed(4)
    d_out = 13
    W, X = torch.randn(d_out, d_in), correlated_inputs(150, d_in)
    cw = compress_weight(W, stats_of(X), Budget(sparsity, scope=scope), cfg=None)
    _, mask, _ = sparsegpt_prune(W, stats_of(X).gram, sparsity, blocksize=blocksize, scope=scope)
    if scope == "layer":
        assert cw.param_count() == d_out * d_in - int(d_out * d_in * sparsity)
        assert int(mask.sum()) == d_out * d_in - int(d_out * d_in * sparsity)
        # each column block prunes its share: floor(out*c1*s) - floor(out*c0*s)
        for c0 in range(0, d_in, blocksize):
            c1 = min(c0 + blocksize, d_in)
            assert int((~mask[:, c0:c1]).sum()) == int(d_out * c1 * sparsity) - int(d_out * c0 * sparsity)
    else:
        assert (cw.dense != 0).sum(1).tolist() == [d_in - int(d_in * sparsity)] * d_out
        assert mask.sum(1).tolist() == [d_in - int(d_in * sparsity)] * d_out
    assert torch.equal(cw.dense != 0, compress_weight(W, stats_of(X), Budget(sparsity, scope=scope)).dense != 0)


@pytest.mark.parametrize("nm, blocksize", [((2, 4), 128), ((2, 4), 6), ((1, 4), 16), ((4, 8), 8)])
def test_nm_pattern_is_exact(nm, blocksize):
    torch.manual_seed(5)
    W, X = torch.randn(11, 48), correlated_inputs(150, 48)
    out, mask, _ = sparsegpt_prune(W, stats_of(X).gram, 0.5, nm=nm, blocksize=blocksize)
    n, m = nm
    assert ((out != 0).reshape(11, 48 // m, m).sum(-1) == n).all()
    assert torch.equal(out != 0, mask)


def test_nm_beats_wanda_nm_on_correlated_inputs():
    torch.manual_seed(6)
    W, X = torch.randn(32, 64), correlated_inputs(512, 64, seed=7)
    st = stats_of(X)
    err = lambda Wh: float((X.double() @ (W.double() - Wh.double()).T).norm())  # noqa: E731
    assert err(compress_weight(W, st, Budget(0.5, nm=(2, 4))).dense) < 0.8 * err(wanda_compress(W, st, Budget(0.5, nm=(2, 4))).dense)


def test_dead_inputs_are_zeroed_and_finite():
    torch.manual_seed(7)
    W, X = torch.randn(8, 20), correlated_inputs(100, 20)
    X[:, [2, 11]] = 0.0
    out, mask, info = sparsegpt_prune(W, stats_of(X).gram, 0.5, blocksize=8)
    assert info["dead_inputs"] == 2
    assert torch.isfinite(out).all()
    assert (out[:, [2, 11]] == 0).all() and not mask[:, [2, 11]].any()  # pruned first (score 0)
    assert int(mask.sum()) == 160 - 80


def test_not_positive_definite_raises_damping_and_logs(caplog):
    torch.manual_seed(8)
    A = torch.randn(16, 16, dtype=torch.float64)
    H = A @ A.T - 3.0 * torch.eye(16, dtype=torch.float64)  # indefinite, positive diagonal
    assert torch.linalg.eigvalsh(H).min() < 0 and (torch.diagonal(H) > 0).all()
    W = torch.randn(5, 16)
    with caplog.at_level(logging.WARNING, logger="baselines.sparsegpt"):
        out, mask, info = sparsegpt_prune(W, H, 0.5, blocksize=8, percdamp=0.01)
    assert info["damp_retries"] >= 1 and info["damp"] > 0.01 * float(torch.diagonal(H).mean())
    assert "not positive definite" in caplog.text
    assert torch.isfinite(out).all() and int(mask.sum()) == 80 - 40
    assert torch.linalg.eigvalsh(H + info["damp"] * torch.eye(16, dtype=torch.float64)).min() > 0


def test_needs_gram():
    with pytest.raises(ValueError, match="Gram"):
        compress_weight(torch.randn(2, 4), InputStats(sq_norms=torch.ones(4), n_tokens=3), Budget(0.5))

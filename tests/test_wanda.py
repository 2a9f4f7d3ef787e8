"""Wanda: scores, masks against brute-force rankings, exact counts, and the planted-activation case."""
import math

import pytest
import torch

from baselines.magnitude import compress_weight as magnitude_compress
from baselines.wanda import compress_weight, wanda_mask, wanda_scores
from oats.interface import Budget, InputStats


def stats_of(X: torch.Tensor) -> InputStats:
    return InputStats(sq_norms=(X.double() ** 2).sum(0).float(), n_tokens=X.shape[0])


def brute_row_mask(W, X, sparsity):
    """Per row: drop the floor(in*s) weights of least |W_ij|*||X_j||, ranked with Python's sorted in float64."""
    norms = [math.sqrt(sum(float(x) ** 2 for x in X[:, j].double())) for j in range(X.shape[1])]
    mask = torch.ones(W.shape, dtype=torch.bool)
    n_drop = int(W.shape[1] * sparsity)
    for i in range(W.shape[0]):
        order = sorted(range(W.shape[1]), key=lambda j: abs(float(W[i, j])) * norms[j])
        for j in order[:n_drop]:
            mask[i, j] = False
    return mask


def test_scores_are_weight_times_input_norm():
    torch.manual_seed(0)
    W, X = torch.randn(5, 7), torch.randn(40, 7)
    s = wanda_scores(W, stats_of(X).col_norms)
    ref = W.double().abs() * X.double().norm(dim=0)[None, :]
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_row_mask_equals_brute_force_ranking(sparsity):
    torch.manual_seed(1)
    W = torch.randn(9, 23)
    X = torch.randn(50, 23) * torch.rand(23) * 4  # features of very different scales
    cw = compress_weight(W, stats_of(X), Budget(sparsity))
    got = cw.dense != 0
    assert torch.equal(got, brute_row_mask(W, X, sparsity))
    assert torch.equal(cw.dense[got], W[got])  # kept weights untouched


def test_layer_scope_equals_brute_force_global_ranking():
    torch.manual_seed(2)
    W, X = torch.randn(6, 10), torch.randn(30, 10) * torch.rand(10)
    mask = wanda_mask(W, stats_of(X).col_norms, Budget(0.6, scope="layer"))
    norms = X.double().norm(dim=0)
    flat = sorted(((abs(float(W[i, j])) * float(norms[j]), i, j) for i in range(6) for j in range(10)))
    ref = torch.ones(6, 10, dtype=torch.bool)
    for _, i, j in flat[: int(60 * 0.6)]:
        ref[i, j] = False
    assert torch.equal(mask, ref)


def test_nm_keeps_the_best_n_of_every_m_inputs():
    torch.manual_seed(3)
    W, X = torch.randn(7, 16), torch.randn(20, 16) * torch.rand(16)
    mask = wanda_mask(W, stats_of(X).col_norms, Budget(0.5, nm=(2, 4)))
    s = wanda_scores(W, stats_of(X).col_norms)
    for i in range(7):
        for g in range(0, 16, 4):
            best = sorted(range(g, g + 4), key=lambda j: -float(s[i, j]))[:2]
            assert sorted(torch.nonzero(mask[i, g : g + 4]).flatten().add(g).tolist()) == sorted(best)


@pytest.mark.parametrize("shape", [(8, 24), (5, 17), (64, 96)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_exact_counts_unstructured(shape, sparsity, scope):
    torch.manual_seed(4)
    W, X = torch.randn(*shape), torch.randn(12, shape[1])
    cw = compress_weight(W, stats_of(X), Budget(sparsity, scope=scope))
    out, inp = shape
    expected = out * (inp - int(inp * sparsity)) if scope == "row" else out * inp - int(out * inp * sparsity)
    assert cw.param_count() == expected
    if scope == "row":
        assert (cw.dense != 0).sum(1).tolist() == [inp - int(inp * sparsity)] * out


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_exact_counts_nm(nm):
    torch.manual_seed(5)
    W, X = torch.randn(10, 32), torch.randn(12, 32)
    cw = compress_weight(W, stats_of(X), Budget(0.5, nm=nm))
    per_group = (cw.dense != 0).reshape(10, 32 // nm[1], nm[1]).sum(-1)
    assert (per_group == nm[0]).all()


def test_planted_large_activation_protects_small_weights():
    """A feature with a huge activation norm keeps its (small) weights; magnitude pruning drops them."""
    torch.manual_seed(6)
    W = torch.randn(16, 32)
    W[:, 3] = 0.05 * torch.sign(torch.randn(16))  # small weights ...
    X = torch.randn(100, 32)
    X[:, 3] *= 1000.0  # ... on an outlier input feature
    wanda = compress_weight(W, stats_of(X), Budget(0.5))
    mag = magnitude_compress(W, None, Budget(0.5, scope="row"))
    assert (wanda.dense[:, 3] != 0).all()
    assert (mag.dense[:, 3] == 0).all()
    err = lambda Wh: float((X @ (W - Wh).T).norm())  # noqa: E731
    assert err(wanda.dense) < err(mag.dense)


def test_needs_statistics():
    with pytest.raises(ValueError, match="statistics"):
        compress_weight(torch.randn(2, 4), None, Budget(0.5))

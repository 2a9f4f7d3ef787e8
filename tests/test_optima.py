"""OPTIMA: the row-wise QP reconstruction, checked against independent float64 references.

References written here: per-row least squares on X itself (not on H), a sequential OBS update with
a fixed mask (SparseGPT's update, independent of baselines/sparsegpt.py), and planted problems whose
optimum is known in closed form.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from weight_updates import optima
from baselines.masks import keep_topk_rows, layer_mask, nm_mask
from oats.interface import CompressedWeight, InputStats


def correlated_inputs(n: int, d: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """[n, d] float64 tokens with strongly correlated features and a few outlier channels (like LLM inputs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)[:, None]
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    X = X * torch.exp(torch.randn(d, generator=g, dtype=torch.float64))  # channel scales spanning ~e^±2
    X[:, :2] *= 20.0  # outlier features
    if dead:
        X[:, list(dead)] = 0.0
    return X


def damped(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    return H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def obs_fixed_mask(W0: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SparseGPT's update for a given mask: prune columns left to right, each pruned weight's error
    spread over the later columns through the upper Cholesky factor of H⁻¹ (no lazy blocking)."""
    W = W0.double().clone()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True)
    for j in range(W.shape[1]):
        w = W[:, j].clone()
        q = torch.where(mask[:, j], w, torch.zeros_like(w))
        err = (w - q) / Hinv[j, j]
        W[:, j] = q
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
    return W


def lstsq_reference(W0: torch.Tensor, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: min ||X_K w_K - X w0||, solved on X (never forming H), minimum-norm when rank deficient."""
    W0 = W0.double()
    Y = X @ W0.T
    out = torch.zeros_like(W0)
    for i in range(W0.shape[0]):
        K = mask[i].nonzero().squeeze(1)
        if K.numel():
            out[i, K] = torch.linalg.pinv(X[:, K]) @ Y[:, i]
    return out


def random_masks(d_out: int, d_in: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(d_out, d_in, generator=g)
    return {
        "row50": keep_topk_rows(scores, d_in // 2),
        "layer60": layer_mask(scores, 0.6),  # rows keep different counts
        "2:4": nm_mask(scores, 2, 4),
    }


def cfg(**kw):
    base = dict(percdamp=0.01, optima_tol=1e-6, optima_max_iters=500, optima_dtype="float64")
    return SimpleNamespace(**{**base, **kw})


# --- exact reference -------------------------------------------------------------------------------


def test_exact_rowwise_matches_least_squares_on_X():
    X = correlated_inputs(300, 40, seed=1)
    W0 = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = random_masks(12, 40, seed=3)["layer60"]
    mask[0] = False  # a row with nothing kept
    mask[1] = True  # a row with everything kept: the answer is w0 itself
    W = optima.exact_rowwise(W0, X.T @ X, mask)
    ref = lstsq_reference(W0, X, mask)
    torch.testing.assert_close(W, ref, rtol=1e-6, atol=1e-8)
    assert torch.equal(W[0], torch.zeros(40, dtype=torch.float64))
    torch.testing.assert_close(W[1], W0[1], rtol=1e-8, atol=1e-8)


def test_planted_dependent_inputs_are_reconstructed_exactly():
    """Pruned inputs that are linear combinations of kept ones lose nothing: x_P = x_K A gives
    w_K = w0_K + A w0_P and a zero objective, although H itself is singular."""
    g = torch.Generator().manual_seed(4)
    n, k, p = 200, 10, 6
    XK = torch.randn(n, k, generator=g, dtype=torch.float64)
    A = torch.randn(k, p, generator=g, dtype=torch.float64)
    X = torch.cat([XK, XK @ A], 1)
    H = X.T @ X  # rank k < k + p
    W0 = torch.randn(5, k + p, generator=g, dtype=torch.float64)
    mask = torch.zeros(5, k + p, dtype=torch.bool)
    mask[:, :k] = True
    expected = torch.cat([W0[:, :k] + W0[:, k:] @ A.T, torch.zeros(5, p, dtype=torch.float64)], 1)
    torch.testing.assert_close(optima.exact_rowwise(W0, H, mask), expected, rtol=1e-8, atol=1e-8)
    W, info = optima.batched(W0, H, mask, tol=1e-10, max_iters=200, dtype=torch.float64)
    assert info["converged"]
    torch.testing.assert_close(W, expected, rtol=1e-7, atol=1e-7)
    assert float(optima.row_objective(W, W0, H).max()) < 1e-8 * float(optima.row_objective(W0 * mask, W0, H).max())


# --- the fast solver against the exact one ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["row50", "layer60", "2:4"])
def test_batched_matches_exact_and_beats_sparsegpt(dtype, mask_kind):
    d_out, d_in = 32, 64
    X = correlated_inputs(512, d_in, seed=5)
    H = damped(X.T @ X)
    W0 = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mask = random_masks(d_out, d_in, seed=7)[mask_kind]

    W_exact = optima.exact_rowwise(W0, H, mask)
    W_fast, info = optima.batched(W0.to(dtype), H.to(dtype), mask, tol=1e-6, max_iters=1000, dtype=dtype)
    assert info["converged"], info
    assert W_fast.dtype == dtype
    W_obs = obs_fixed_mask(W0, H, mask)

    f_exact = optima.row_objective(W_exact, W0, H)
    f_fast = optima.row_objective(W_fast, W0, H)
    f_obs = optima.row_objective(W_obs, W0, H)
    f_none = optima.row_objective(W0 * mask, W0, H)
    assert float((f_fast.sum() - f_exact.sum()) / f_exact.sum()) <= 1e-4
    assert bool((f_fast <= f_exact * (1 + 1e-4) + 1e-12).all())
    # the exact optimum is the optimum: no feasible point does better, row by row
    assert bool((f_exact <= f_obs * (1 + 1e-9)).all()) and bool((f_exact <= f_none * (1 + 1e-9)).all())
    assert bool((f_fast <= f_obs * (1 + 1e-4)).all()) and bool((f_fast <= f_none * (1 + 1e-4)).all())
    assert float(f_obs.sum()) < float(f_none.sum())  # the SparseGPT reference is a real update
    assert float(f_exact.sum()) < 0.99 * float(f_obs.sum())  # and OPTIMA strictly improves on it here
    # the zero pattern is the mask's, exactly
    assert bool((W_fast[~mask] == 0).all()) and bool((W_exact[~mask] == 0).all())


@pytest.mark.parametrize("precond", ["jacobi", "hinv"])
def test_batched_preconditioners_and_warm_start_reach_the_same_optimum(precond):
    X = correlated_inputs(400, 48, seed=8)
    H = damped(X.T @ X)
    W0 = torch.randn(20, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = random_masks(20, 48, seed=10)["row50"]
    W_exact = optima.exact_rowwise(W0, H, mask)
    f_exact = optima.row_objective(W_exact, W0, H).sum()
    for init in (None, obs_fixed_mask(W0, H, mask), torch.randn_like(W0)):  # any start, even off-mask junk
        W, info = optima.batched(W0, H, mask, tol=1e-9, max_iters=1000, dtype=torch.float64, init=init, precond=precond)
        assert info["converged"]
        assert abs(float(optima.row_objective(W, W0, H).sum() / f_exact) - 1) < 1e-9
        assert bool((W[~mask] == 0).all())


def test_batched_respects_iteration_cap():
    X = correlated_inputs(400, 48, seed=11)
    H = damped(X.T @ X, 1e-4)
    W0 = torch.randn(8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    mask = random_masks(8, 48, seed=13)["row50"]
    W, info = optima.batched(W0, H, mask, tol=1e-12, max_iters=3, dtype=torch.float64)
    assert info["iters"] == 3 and not info["converged"] and info["rows_not_converged"] > 0
    assert bool((W[~mask] == 0).all())


# --- dampening and dead inputs ---------------------------------------------------------------------


def test_dead_input_channels(caplog):
    d_in, dead = 32, (3, 17, 30)
    X = correlated_inputs(256, d_in, seed=14, dead=dead)
    H = X.T @ X  # exactly singular: rows/columns of the dead channels are 0
    W0 = torch.randn(16, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    mask = random_masks(16, d_in, seed=16)["row50"]
    mask[:, 3] = True  # a dead channel kept by every row
    # exact reference on the singular Gram: still the least-squares optimum (weights on dead inputs: min norm = 0)
    W_exact = optima.exact_rowwise(W0, H, mask)
    torch.testing.assert_close(W_exact, lstsq_reference(W0, X, mask), rtol=1e-6, atol=1e-8)

    stats = InputStats(sq_norms=torch.diagonal(H).float(), n_tokens=256, gram=H.float())
    cw = CompressedWeight(dense=W0.float() * mask, mask=mask)
    with caplog.at_level(logging.WARNING, logger="weight_updates.optima"):
        out = optima.update(W0.float(), cw, stats, cfg(percdamp=0.0))  # undampened: Cholesky fails, damping raised
    assert "dampening raised" in caplog.text
    assert out.info["optima_damp_raised"] > 0 and out.info["optima_damp"] > 0
    assert torch.isfinite(out.dense).all() and bool((out.dense[~mask] == 0).all())
    # the output on the calibration inputs is as good as the exact optimum (dead channels cannot matter)
    f_out = optima.row_objective(out.dense, W0, H).sum()
    f_exact = optima.row_objective(W_exact, W0, H).sum()
    assert float(f_out) <= float(f_exact) * (1 + 1e-4)
    # with the default dampening nothing needs raising, and the kept dead weight keeps its value
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weight_updates.optima"):
        out2 = optima.update(W0.float(), cw, stats, cfg())
    assert "dampening raised" not in caplog.text and out2.info["optima_damp_raised"] == 0
    torch.testing.assert_close(out2.dense[:, 3], W0[:, 3].float(), rtol=1e-4, atol=1e-5)


def test_dampen_all_zero_gram_masks_only():
    stats = InputStats(sq_norms=torch.zeros(8), n_tokens=10, gram=torch.zeros(8, 8))
    W0 = torch.randn(4, 8)
    mask = random_masks(4, 8, seed=17)["row50"]
    out = optima.update(W0, CompressedWeight(dense=W0 * mask, mask=mask), stats, cfg())
    torch.testing.assert_close(out.dense, W0 * mask)


# --- the pipeline entry ----------------------------------------------------------------------------


@pytest.mark.parametrize("optima_dtype", ["float32", "float64"])
def test_update_dense_keeps_mask_and_reaches_optimum(optima_dtype):
    X = correlated_inputs(512, 64, seed=18)
    W0 = torch.randn(24, 64, generator=torch.Generator().manual_seed(19))
    mask = random_masks(24, 64, seed=20)["2:4"]
    stats = InputStats(sq_norms=(X * X).sum(0).float(), n_tokens=512, gram=(X.T @ X).float())
    c = cfg(optima_dtype=optima_dtype)
    out = optima.update(W0, CompressedWeight(dense=W0 * mask, mask=mask, info={"from": "selector"}), stats, c)
    assert out.dense.dtype == W0.dtype and torch.equal(out.mask, mask)
    assert bool((out.dense[~mask] == 0).all())
    assert out.info["from"] == "selector" and out.info["optima_converged"]
    H = damped(X.T @ X)
    f = optima.row_objective(out.dense, W0, H).sum()
    f_exact = optima.row_objective(optima.exact_rowwise(W0, H, mask), W0, H).sum()
    assert float((f - f_exact) / f_exact) <= 1e-4
    assert out.info["optima_obj_after"] <= out.info["optima_obj_before"]


def test_update_without_explicit_mask_uses_nonzeros():
    X = correlated_inputs(256, 16, seed=21)
    W0 = torch.randn(6, 16, generator=torch.Generator().manual_seed(22))
    mask = random_masks(6, 16, seed=23)["row50"]
    kept = W0 * mask
    r = mask[0].nonzero()[0].item()
    kept[0, r] = 0.0  # a kept weight that is exactly zero
    stats = InputStats(sq_norms=(X * X).sum(0).float(), n_tokens=256, gram=(X.T @ X).float())
    implicit = optima.update(W0, CompressedWeight(dense=kept), stats, cfg())
    assert implicit.dense[0, r] == 0 and torch.equal(implicit.dense != 0, kept != 0)
    explicit = optima.update(W0, CompressedWeight(dense=kept, mask=mask), stats, cfg())
    assert explicit.dense[0, r] != 0 and torch.equal(explicit.dense != 0, mask)


def test_update_factored_resolves_sparse_part_with_low_rank_fixed():
    X = correlated_inputs(512, 48, seed=24)
    g = torch.Generator().manual_seed(25)
    W0 = torch.randn(20, 48, generator=g)
    U, V = torch.randn(20, 3, generator=g), torch.randn(3, 48, generator=g)
    mask = random_masks(20, 48, seed=26)["row50"]
    S = (W0 - U @ V) * mask
    stats = InputStats(sq_norms=(X * X).sum(0).float(), n_tokens=512, gram=(X.T @ X).float())
    out = optima.update(W0, CompressedWeight(sparse=S, U=U, V=V), stats, cfg())
    assert out.is_factored and out.U is U and out.V is V
    assert bool((out.sparse[~mask] == 0).all())
    H = damped(X.T @ X)
    target = (W0 - U @ V).double()
    S_exact = optima.exact_rowwise(target, H, mask)
    f = optima.row_objective(out.sparse, target, H).sum()
    f_exact = optima.row_objective(S_exact, target, H).sum()
    assert float((f - f_exact) / f_exact) <= 1e-4
    assert float(optima.row_objective(out.to_dense(), W0, H).sum()) < float(optima.row_objective(S + U @ V, W0, H).sum())


def test_optima_through_the_pipeline_lowers_block_output_error():
    """magnitude + OPTIMA on a tiny llama: same sparsity, exact zeros, closer block outputs than magnitude alone."""
    import copy

    from ml_collections import ConfigDict

    from oats.compressor import compress_model
    from oats.config import resolve
    from oats.architectures import get_blocks
    from oats.pipeline import capture_inputs, run_block
    from tests.conftest import tiny_model

    dense = tiny_model("llama", layers=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(27))
    errs, records = {}, {}
    for update in ("none", "optima"):
        model = copy.deepcopy(dense)
        c = resolve(ConfigDict(dict(model="tiny", method="magnitude", sparsity=0.5, mask_scope="row", weight_update=update, cal_batch_size=4)))
        inputs = capture_inputs(model, ids, torch.device("cpu"), 4)
        records[update] = compress_model(model, inputs, c, torch.device("cpu"), [0.5, 0.5])
        h0 = capture_inputs(dense, ids, torch.device("cpu"), 4)
        b_dense, b_comp = get_blocks(dense)[0], get_blocks(model)[0]
        ref = run_block(b_dense, h0.hidden[0], h0.kwargs_for(h0.hidden[0]))
        errs[update] = float((run_block(b_comp, h0.hidden[0], h0.kwargs_for(h0.hidden[0])) - ref).norm() / ref.norm())
        for blk in get_blocks(model):
            for lin in [m for m in blk.modules() if isinstance(m, torch.nn.Linear)]:
                assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2
    assert errs["optima"] < errs["none"]
    assert all(r["optima_converged"] and r["optima_obj_after"] < r["optima_obj_before"] for r in records["optima"])
    for a, b in zip(records["none"], records["optima"]):
        assert a["kept_params"] == b["kept_params"] and b["scaled_rel_error"] is not None


def test_config_validation_of_update_keys():
    from ml_collections import ConfigDict

    from oats.config import ConfigError, resolve
    from oats.registry import WEIGHT_UPDATES

    assert "optima" in WEIGHT_UPDATES
    ok = resolve(ConfigDict(dict(model="m", method="wanda", weight_update="optima")))
    assert ok.weight_update == "optima" and ok.name.endswith("-optima")
    for bad, key in [(dict(method="dense", weight_update="optima"), "weight_update"), (dict(method="wanda", weight_update="obs"), "weight_update"),
                     (dict(method="wanda", weight_update="optima", optima_dtype="float16"), "optima_dtype"),
                     (dict(method="wanda", weight_update="optima", optima_tol=0.0), "optima_tol"),
                     (dict(method="wanda", weight_update="optima", optima_tol=float("inf")), "optima_tol"),
                     (dict(method="wanda", weight_update="optima", optima_max_iters=0), "optima_max_iters")]:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            resolve(ConfigDict(dict(model="m", **bad)))

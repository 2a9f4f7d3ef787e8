"""OPTIMA: re-solve the surviving weights of a pruned layer as a quadratic program (row-wise).

A selector (magnitude, Wanda, SparseGPT, OATS's sparse part) fixes the mask; OPTIMA keeps it and
moves the kept weights so the layer's output on the calibration inputs is reproduced as well as the
mask allows. With ``H = XᵀX`` (the Gram of the layer's inputs, shared by all rows) each output row
``w`` (original ``w0``) is an independent QP::

    minimize (w - w0)ᵀ H (w - w0)   subject to   w_j = 0 for every pruned j of that row

Setting the gradient on the kept set K to zero gives the SPD system ``H_KK w_K = (H w0)_K``: the
kept weights absorb what the pruned ones contributed, through the input correlations.

Two solvers, both pure functions of tensors:

- :func:`exact_rowwise`: the reference, one float64 solve on ``H_KK`` per row (d_out solves of size
  ~|K|). Slow, exact; the tests hold the fast solver to it.
- :func:`batched`: preconditioned conjugate gradient on all rows at once. The operator of row i is
  ``P_i H P_i`` (P_i its mask projector), so one iteration is a single ``[out, in] @ [in, in]``
  matmul followed by masking, and per-row scalars. Rows stop counting once their relative residual
  is below ``tol``. GPU-friendly, float32 or float64, warm-started from any feasible point.

:func:`update` is the pipeline's entry (``WEIGHT_UPDATES["optima"]``): dampens H as SparseGPT does
(``percdamp`` times the mean diagonal on the diagonal, raised tenfold and logged until a Cholesky
factorisation in the solver's precision succeeds), warm-starts from the better of the selector's
own weights and the plainly masked ones, runs :func:`batched` with the ``P_i H⁻¹ P_i``
preconditioner, and returns the same mask with re-solved values.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from oats.interface import CompressedWeight, InputStats, WeightUpdate
from oats.keys import Key, KeyTable, choice, non_negative, positive

log = logging.getLogger(__name__)

PRECONDITIONERS = ("jacobi", "hinv")

KEYS = KeyTable({
    "percdamp": Key(0.01, (float, int), "SparseGPT/OPTIMA dampening: fraction of the mean Hessian diagonal added to it", non_negative),
    "optima_tol": Key(1e-6, (float,), "OPTIMA batched solver: relative residual tolerance", positive),
    "optima_max_iters": Key(500, (int,), "OPTIMA batched solver: iteration cap", positive),
    "optima_dtype": Key("float32", (str,), "OPTIMA solver precision", choice("float32", "float64")),
})


def row_objective(W: Tensor, W0: Tensor, H: Tensor) -> Tensor:
    """[out] float64: (w_i - w0_i)ᵀ H (w_i - w0_i) per row, i.e. ||X (w_i - w0_i)||² when H = XᵀX."""
    D = W.double() - W0.double()
    return ((D @ H.double()) * D).sum(1)


def exact_rowwise(W0: Tensor, H: Tensor, mask: Tensor) -> Tensor:
    """Exact per-row solution in float64: for each row, ``w_K = H_KK⁻¹ (H w0)_K``, zero elsewhere.

    W0: [out, in] original weights; H: [in, in] symmetric PSD (already dampened if wanted);
    mask: [out, in] bool, True = kept. Returns [out, in] float64 with exact zeros off the mask.
    A singular ``H_KK`` (dead or dependent kept inputs) gets the minimum-norm least-squares solution.
    """
    W0d, Hd = W0.double(), H.double()
    B = W0d @ Hd
    out = torch.zeros_like(W0d)
    for i in range(W0d.shape[0]):
        K = mask[i].nonzero().squeeze(1)
        if K.numel() == 0:
            continue
        A = Hd[K][:, K]
        L, bad = torch.linalg.cholesky_ex(A)
        if int(bad) == 0:
            out[i, K] = torch.cholesky_solve(B[i, K, None], L).squeeze(1)
        else:
            out[i, K] = torch.linalg.pinv(A, hermitian=True) @ B[i, K]
    return out


def batched(
    W0: Tensor,
    H: Tensor,
    mask: Tensor,
    tol: float = 1e-6,
    max_iters: int = 500,
    dtype: torch.dtype = torch.float32,
    init: Tensor | None = None,
    precond: str = "jacobi",
    H_inv: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """All rows' QPs at once by preconditioned conjugate gradient on the masked systems.

    W0: [out, in]; H: [in, in] symmetric positive definite (dampen it first); mask: [out, in] bool.
    tol: stop a row when ||r_i|| <= tol * ||(H w0_i)_K||, r_i the residual of ``H_KK w_K = (H w0)_K``.
    max_iters: iteration cap (one ``[out, in] @ [in, in]`` matmul per iteration for the active rows).
    dtype: the arithmetic's precision. init: [out, in] starting point (its off-mask entries are
    ignored); default ``W0 * mask``. precond: ``'jacobi'`` (1 / diag H on the kept entries) or
    ``'hinv'`` (``P_i H⁻¹ P_i``: one more matmul per iteration, 2-3x fewer iterations, needs ``H_inv``
    or computes it). Runs on W0's device.

    Returns (W [out, in] in W0's dtype with exact zeros off the mask, info) where info has
    ``iters``, ``max_rel_residual``, ``converged`` (every row below tol) and ``rows_not_converged``.
    """
    if precond not in PRECONDITIONERS:
        raise ValueError(f"precond {precond!r}; allowed: {PRECONDITIONERS}")
    Hs = H.to(W0.device, dtype)
    m = mask.to(W0.device, dtype)
    B = m * (W0.to(dtype) @ Hs)
    X = m * (init if init is not None else W0).to(W0.device, dtype)
    R = B - m * (X @ Hs)
    if precond == "jacobi":
        dinv = 1.0 / torch.diagonal(Hs).clamp_min(torch.finfo(dtype).tiny)

        def apply_prec(Rr: Tensor, mr: Tensor) -> Tensor:
            return Rr * dinv
    else:
        Hi = (H_inv if H_inv is not None else torch.cholesky_inverse(torch.linalg.cholesky(Hs))).to(W0.device, dtype)

        def apply_prec(Rr: Tensor, mr: Tensor) -> Tensor:
            return mr * (Rr @ Hi)

    bnorm = B.norm(dim=1)
    r0 = R.norm(dim=1)
    # Rows with (H w0)_K = 0 are measured against their starting residual (or absolutely if that is 0 too).
    scale = torch.where(bnorm > 0, bnorm, torch.where(r0 > 0, r0, torch.ones_like(r0)))
    Z = apply_prec(R, m)
    P = Z.clone()
    rz = (R * Z).sum(1)
    rel = r0 / scale
    iters = 0
    for iters in range(1, max_iters + 1):
        active = (rel > tol).nonzero().squeeze(1)
        if active.numel() == 0:
            iters -= 1
            break
        full = active.numel() == X.shape[0]
        ma = m if full else m[active]
        Pa = P if full else P[active]
        APa = ma * (Pa @ Hs)
        pAp = (Pa * APa).sum(1)
        rza = rz if full else rz[active]
        ok = pAp > 0
        alpha = torch.where(ok, rza / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        Ra = (R if full else R[active]) - alpha[:, None] * APa
        Xa = (X if full else X[active]) + alpha[:, None] * Pa
        Za = apply_prec(Ra, ma)
        rz_new = (Ra * Za).sum(1)
        beta = torch.where(rza > 0, rz_new / torch.where(rza > 0, rza, torch.ones_like(rza)), torch.zeros_like(rza))
        Pa = Za + beta[:, None] * Pa
        if full:
            X, R, P, rz = Xa, Ra, Pa, rz_new
        else:
            X[active], R[active], P[active], rz[active] = Xa, Ra, Pa, rz_new
        rel[active] = Ra.norm(dim=1) / scale[active]
    W = torch.where(mask.to(W0.device), X, torch.zeros((), dtype=dtype, device=W0.device)).to(W0.dtype)
    not_conv = int((rel > tol).sum())
    info = {"iters": iters, "max_rel_residual": float(rel.max()) if rel.numel() else 0.0,
            "converged": not_conv == 0, "rows_not_converged": not_conv}
    return W, info


def dampen(H: Tensor, percdamp: float, dtype: torch.dtype = torch.float64, max_raises: int = 12) -> tuple[Tensor, Tensor, float, int]:
    """SparseGPT's dampening: ``H + lam I`` with ``lam = percdamp * mean(diag H)``.

    If the Cholesky factorisation fails in ``dtype`` (H singular: dead inputs, percdamp 0, rounding),
    the dampening is raised tenfold (from at least 1e-8 of the mean diagonal) until it succeeds, and
    the raise is logged. A Gram with an all-zero diagonal (no signal at all) becomes the identity.
    Returns (dampened H in dtype, its Cholesky factor L, lam used, number of raises).
    """
    Hd = H.to(dtype)
    mean_diag = float(torch.diagonal(Hd).mean())
    if not mean_diag > 0:
        log.warning("OPTIMA: input Gram is all zero; using the identity (weights only masked)")
        eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
        return eye, eye, 1.0, 0
    frac = float(percdamp)
    for raises in range(max_raises + 1):
        A = Hd + frac * mean_diag * torch.eye(H.shape[0], dtype=dtype, device=H.device)
        L, bad = torch.linalg.cholesky_ex(A)
        if int(bad) == 0:
            if raises:
                log.warning("OPTIMA: Gram not positive definite at percdamp=%g; dampening raised to %g of the mean diagonal", percdamp, frac)
            return A, L, frac * mean_diag, raises
        frac = max(frac * 10.0, 1e-8)
    raise RuntimeError(f"OPTIMA: Gram stays indefinite even with dampening {frac / 10:g} of the mean diagonal (NaN/Inf in the statistics?)")


def _mask_of(cw: CompressedWeight) -> Tensor:
    if cw.mask is not None:
        return cw.mask.bool()
    # No explicit mask: the nonzeros. A kept weight that is exactly 0 is then treated as pruned (it
    # stays 0), which can only lower the parameter count, never exceed the budget.
    return (cw.sparse if cw.is_factored else cw.dense) != 0


def update(weight: Tensor, cw: CompressedWeight, stats: InputStats | None, cfg: Any) -> CompressedWeight:
    """``WEIGHT_UPDATES['optima']``: keep ``cw``'s mask, re-solve its kept weights (see the module docstring).

    weight: [out, in] original dense weight; cw: the selector's answer (dense, or OATS factors: then
    the sparse part is re-solved with ``U V`` fixed, i.e. against the target ``weight - U V``);
    stats: needs ``stats.gram``. cfg: percdamp, optima_tol, optima_max_iters, optima_dtype.
    """
    if stats is None or stats.gram is None:
        raise ValueError("OPTIMA needs the input Gram matrix (stats kind 'gram')")
    dtype = torch.float64 if cfg.optima_dtype == "float64" else torch.float32
    mask = _mask_of(cw).to(weight.device)
    target = weight.float()
    if cw.is_factored and cw.U is not None and cw.V is not None and cw.U.shape[1] > 0:
        target = target - cw.U.float() @ cw.V.float()
    current = (cw.sparse if cw.is_factored else cw.dense).to(weight.device, torch.float32)
    Hd, L, lam, raises = dampen(stats.gram.to(weight.device), cfg.percdamp, dtype)
    # Warm start, row by row, from the better of the selector's own weights and the plain masked ones.
    plain = target * mask
    f_cur = row_objective(current * mask, target, Hd)
    f_plain = row_objective(plain, target, Hd)
    init = torch.where((f_cur <= f_plain)[:, None], current * mask, plain)
    f_init = torch.minimum(f_cur, f_plain)
    # Preconditioner P_i H⁻¹ P_i from the Cholesky factor dampening just computed: 2-3x fewer
    # iterations than Jacobi on real LLM Grams (bench/bench_optima.py).
    W, info = batched(target, Hd, mask, cfg.optima_tol, cfg.optima_max_iters, dtype, init=init,
                      precond="hinv", H_inv=torch.cholesky_inverse(L))
    f_new = row_objective(W, target, Hd)
    worse = f_new > f_init  # cannot happen at convergence; a guard against a stalled low-precision run
    if bool(worse.any()):
        W = torch.where(worse[:, None], init, W)
        f_new = torch.where(worse, f_init, f_new)
    if not info["converged"]:
        log.warning("OPTIMA: %d rows above tol %g after %d iterations (max relative residual %.2e)",
                    info["rows_not_converged"], cfg.optima_tol, info["iters"], info["max_rel_residual"])
    W = torch.where(mask, W.float(), torch.zeros((), device=W.device)).to(weight.dtype)
    out_info = {
        **cw.info,
        "optima_iters": info["iters"],
        "optima_max_rel_residual": info["max_rel_residual"],
        "optima_converged": info["converged"],
        "optima_damp": lam,
        "optima_damp_raised": raises,
        "optima_obj_before": float(f_cur.sum()),
        "optima_obj_plain_mask": float(f_plain.sum()),
        "optima_obj_after": float(f_new.sum()),
    }
    if cw.is_factored:
        return CompressedWeight(sparse=W, U=cw.U, V=cw.V, info=out_info, mask=mask)
    return CompressedWeight(dense=W, info=out_info, mask=mask)


WEIGHT_UPDATE = WeightUpdate("optima", update, stats="gram", keys=KEYS,
                             workspace=lambda d_out, d_in, cfg: 4 * d_in * d_in * 4 + 4 * d_out * d_in * 4,
                             doc="keep the mask, re-solve the kept weights of every row as a QP on the calibration Gram "
                                 "(for sparse + low-rank answers: the sparse part, U V fixed)",
                             paper="OPTIMA")

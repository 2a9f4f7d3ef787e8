"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight updates.

Follows the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt):

* Hessian ``H = 2 X^T X / n`` of the layer-wise loss ``||X W^T - X W_hat^T||^2`` (the scale does not
  change the result); dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weight column zeroed.
* Dampening ``percdamp * mean(diag H)`` on the diagonal. When the Cholesky factorisation still fails
  (H not positive definite in floating point), the dampening is multiplied by 10 until it succeeds;
  each retry is logged as a warning and the final value is recorded in ``info``.
* ``Hinv`` = upper Cholesky factor of ``H^-1``. Columns are processed in blocks of ``blocksize``: the
  mask of a block is chosen by ``w^2 / Hinv_jj^2`` on the weights *as updated so far* (adaptive mask
  selection), then each column is pruned in turn and its error ``(w - q) / Hinv_jj`` is propagated to
  the remaining columns of the block (``Hinv[j, j:]``) and, lazily, to the later blocks.
* N:M (N kept of every M inputs): within each block, every group of M columns chooses its M-N pruned
  weights per row when the sweep reaches the group (so the group sees the updates of earlier columns);
  the block size is rounded down to a multiple of M.

Exact counts (our rule; the reference's ``score <= sorted[k]`` prunes k+1 per block, ties aside):

* scope ``layer`` (default, the reference's whole-tile selection): the block covering columns
  ``[c0, c1)`` prunes ``floor(d_out*c1*s) - floor(d_out*c0*s)`` weights, chosen over the whole
  ``d_out x (c1-c0)`` tile; the layer total telescopes to exactly ``floor(d_out*d_in*s)``.
* scope ``row``: the same rule per row, ``floor(c1*s) - floor(c0*s)`` per row per block, so every row
  loses exactly ``floor(d_in*s)``, as ``baselines.masks.row_mask`` does.

Pruned weights are exact zeros; kept weights carry the OBS updates. Columns of dead inputs are zero
(as in the reference) and score 0, so they are pruned first; only when a block holds more dead weights
than it must prune does the layer end up sparser than the budget (counted as zeros in the record).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from oats.interface import Budget, CompressedWeight, InputStats, Method
from oats.keys import Key, KeyTable, non_negative, positive

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 12

# percdamp is OPTIMA's key too, declared there identically.
KEYS = KeyTable({
    "percdamp": Key(0.01, (float, int), "SparseGPT/OPTIMA dampening: fraction of the mean Hessian diagonal added to it", non_negative),
    "blocksize": Key(128, (int,), "SparseGPT column block size (mask chosen per block)", positive),
})


def hessian_inverse_factor(H: Tensor, percdamp: float) -> tuple[Tensor, dict[str, Any]]:
    """Upper Cholesky factor U of (H + damp*I)^-1 (so U^T U = (H + damp I)^-1), computed in float64.

    H: [d, d] symmetric positive semi-definite with a nonzero diagonal (dead inputs already fixed).
    damp starts at ``percdamp * mean(diag H)`` and is multiplied by 10 while a factorisation fails.
    Returns (U [d, d] float64, {"damp": final absolute dampening, "damp_retries": number of increases}).
    """
    H = H.to(torch.float64)
    mean_diag = float(torch.diagonal(H).mean())
    damp = percdamp * mean_diag
    idx = torch.arange(H.shape[0], device=H.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, err = torch.linalg.cholesky_ex(Hd)
        if int(err) == 0:
            U, err = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(err) == 0 and bool(torch.isfinite(U).all()):
                return U, {"damp": damp, "damp_retries": retry}
        new = max(damp * 10.0, 1e-6 * mean_diag)
        log.warning("SparseGPT: Hessian not positive definite with dampening %.3g; retrying with %.3g", damp, new)
        damp = new
    raise RuntimeError(f"SparseGPT: Hessian still not positive definite after {MAX_DAMP_RETRIES} dampening increases (damp={damp:.3g})")


def _tile_counts(d_out: int, c0: int, c1: int, sparsity: float, scope: str) -> int:
    """Weights pruned in columns [c0, c1): per tile (scope 'layer') or per row (scope 'row')."""
    rows = d_out if scope == "layer" else 1
    return math.floor(rows * c1 * sparsity) - math.floor(rows * c0 * sparsity)


def sparsegpt_prune(
    weight: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: str = "layer",
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Prune ``weight`` [out, in] against the Hessian ``H`` [in, in] (any positive multiple of X^T X).

    sparsity: fraction removed (ignored when ``nm`` = (N kept, M) is given); scope: 'layer' or 'row'
    (unstructured only, see the module docstring for the exact counts).
    mask: optional fixed boolean [out, in] mask (True = kept) used instead of choosing one; the OBS
    updates are then those of that mask (``sparsity``, ``nm`` and ``scope`` are ignored).
    Returns (pruned weight [out, in] in weight's dtype, boolean mask [out, in] True = kept, info dict).
    """
    if scope not in ("layer", "row"):
        raise ValueError(f"mask scope {scope!r}; allowed: 'row', 'layer'")
    d_out, d_in = weight.shape
    W = weight.detach().clone().float()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, info = hessian_inverse_factor(H, percdamp)
    Hinv = U.to(W.dtype)
    del H, U

    if mask is not None:
        if mask.shape != W.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(W.shape)}")
        nm = None
    elif nm is not None:
        n_keep, m = nm
        if d_in % m:
            raise ValueError(f"N:M sparsity {n_keep}:{m} needs the input dimension ({d_in}) to be a multiple of M={m}")
        blocksize = max(m, (blocksize // m) * m)
    fixed = mask.to(device=W.device, dtype=torch.bool) if mask is not None else None
    mask = torch.ones_like(W, dtype=torch.bool)
    losses = torch.zeros(d_out, dtype=torch.float64, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if fixed is not None:
            keep1 = fixed[:, i1:i2].clone()
        elif nm is None:
            k = _tile_counts(d_out, i1, i2, sparsity, scope)
            if k > 0:
                score = W1**2 / d1[None, :] ** 2
                if scope == "layer":
                    keep1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
                else:
                    keep1.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        for i in range(count):
            if nm is not None and i % m == 0:
                score = W1[:, i : i + m] ** 2 / d1[None, i : i + m] ** 2
                drop = torch.topk(score, m - n_keep, dim=1, largest=False).indices
                keep1[:, i : i + m].scatter_(1, drop, False)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d
            losses += (err.double() ** 2) / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    info = {**info, "dead_inputs": int(dead.sum()), "obs_loss": float(losses.sum())}
    return W.to(weight.dtype), mask, info


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    if stats is None or stats.gram is None:
        raise ValueError("sparsegpt needs the Gram matrix of its inputs (the registry asks the pipeline for stats='gram')")
    H = stats.gram.to(torch.float64) * (2.0 / max(stats.n_tokens, 1))
    pruned, mask, info = sparsegpt_prune(
        weight,
        H,
        budget.sparsity,
        nm=budget.nm,
        blocksize=int(KEYS.value(cfg, "blocksize")),
        percdamp=float(KEYS.value(cfg, "percdamp")),
        scope=budget.scope or "layer",
    )
    return CompressedWeight(dense=pruned, mask=mask, info=info)


METHOD = Method("sparsegpt", compress_weight, stats="gram", keys=KEYS,
                workspace=lambda d_out, d_in, cfg: 4 * d_in * d_in * 8 + 3 * d_out * d_in * 4,  # H, its factors (float64); W, losses, mask
                doc="OBS updates with `H = 2XᵀX/n`, adaptive mask per column block of `blocksize`, dampening `percdamp`",
                paper="Frantar & Alistarh 2023")

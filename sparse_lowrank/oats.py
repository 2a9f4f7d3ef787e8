"""The registered ``oats`` method: alternating thresholding of the scaled weight at the OATS budget.

Its keys: ``rank_ratio`` (kappa, shared with ``gram_slr``), ``num_iters``, ``svd`` ('fast' | 'exact'),
``svd_tol``; it reads the common ``sparsity`` (the compression rate rho) and ``sparsity_type`` through
the budget, and compress mode's ``compress`` through ``sparse_lowrank.common.build_module``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from oats.interface import Budget, CompressedWeight, InputStats, Method
from oats.keys import Key, KeyTable, choice, interval, positive
from sparse_lowrank.common import RANK_RATIO, budget_info, build_module, oats_budget, validate
from sparse_lowrank.decompose import SVD_TOL, decompose

KEYS = KeyTable({
    "rank_ratio": RANK_RATIO,
    "num_iters": Key(80, (int,), "OATS alternating-thresholding iterations (paper: 80)", positive),
    "svd": Key("fast", (str,), "OATS low-rank step: `fast` (warm-started subspace iteration) or `exact` (full SVD each iteration)", choice("fast", "exact")),
    "svd_tol": Key(SVD_TOL, (float,), "OATS `svd: fast`: subspace iteration stops once the top-r Ritz residual is below this fraction of the rank-r error", interval(0.0, 1.0, lo_closed=False)),
})


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    """W [d_out, d_in] -> factors S [d_out, d_in] (exact zeros), U [d_out, r], V [r, d_in] with W ~ S + U V.

    ``info``: rank, nonzeros, kept_params, achieved_compression (exact), target compression, keep_per_row,
    final scaled objective, and the fast path's mean subspace-iteration steps per iteration.
    """
    if stats is None:
        raise ValueError("oats needs the inputs' second moments (stats='diag')")
    d_out, d_in = weight.shape
    svd = KEYS.value(cfg, "svd")
    b = oats_budget(d_out, d_in, budget.sparsity, KEYS.value(cfg, "rank_ratio"), budget.nm)
    res = decompose(weight, stats.second_moment, b.rank, b.keep_per_row, int(KEYS.value(cfg, "num_iters")), b.nm, svd=svd,
                    tol=float(KEYS.value(cfg, "svd_tol")), track_objective=False)
    info = {
        **budget_info(b, int((res.sparse != 0).sum()), budget.sparsity),
        "oats_objective": res.objective[-1] if res.objective else None,
        "svd": svd,
    }
    if res.subspace_steps:
        info["subspace_steps_mean"] = sum(res.subspace_steps) / len(res.subspace_steps)
    return CompressedWeight(sparse=res.sparse, U=res.U, V=res.V, info=info)


def label(cfg: Mapping[str, Any]) -> str:
    svd = "exact SVD" if KEYS.value(cfg, "svd") == "exact" else "fast"
    return f"OATS (κ={KEYS.value(cfg, 'rank_ratio'):g}, {KEYS.value(cfg, 'num_iters')} it, {svd})"


METHOD = Method(
    "oats", compress_weight, stats="diag",
    doc="`W·diag(√D) ≈ S + L` by alternating thresholding; `sparsity` is the compression rate, `rank_ratio` κ",
    paper="Zhang & Papyan, ICLR 2025", keys=KEYS, lowrank=True, validate=validate, build_module=build_module, label=label,
    workspace=lambda d_out, d_in, cfg: 6 * d_out * d_in * 4,  # W D^1/2, S, L, the residual, the threshold's scratch, the mask
)

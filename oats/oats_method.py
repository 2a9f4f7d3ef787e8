"""The registered ``oats`` method: budget split, alternating thresholding, factors for the pipeline.

Config keys read: ``sparsity`` (the compression rate rho, via the budget), ``rank_ratio`` (kappa),
``num_iters``, ``svd`` ('fast' | 'exact'), ``svd_tol``, ``sparsity_type`` (via ``budget.nm``).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from oats.config import KEYS
from oats.decompose import decompose, oats_budget
from oats.interface import Budget, CompressedWeight, InputStats

# defaults when no config is given: the config schema's own, so the two cannot drift apart
DEFAULTS = {k: KEYS[k].default for k in ("rank_ratio", "num_iters", "svd", "svd_tol")}


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return DEFAULTS[key]
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return DEFAULTS[key] if value is None else value


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    """W [d_out, d_in] -> factors S [d_out, d_in] (exact zeros), U [d_out, r], V [r, d_in] with W ~ S + U V.

    ``info``: rank, nonzeros, kept_params, achieved_compression (exact), target compression, keep_per_row,
    final scaled objective, and the fast path's mean subspace-iteration steps per iteration.
    """
    if stats is None:
        raise ValueError("oats needs the inputs' second moments (stats='diag')")
    d_out, d_in = weight.shape
    b = oats_budget(d_out, d_in, budget.sparsity, _get(cfg, "rank_ratio"), budget.nm)
    res = decompose(weight, stats.second_moment, b.rank, b.keep_per_row, int(_get(cfg, "num_iters")), b.nm, svd=_get(cfg, "svd"),
                    tol=float(_get(cfg, "svd_tol")), track_objective=False)
    nnz = int((res.sparse != 0).sum())
    kept = nnz + b.rank * (d_out + d_in)
    info = {
        "rank": b.rank,
        "nonzeros": nnz,
        "keep_per_row": b.keep_per_row,
        "kept_params": kept,
        "achieved_compression": 1.0 - kept / (d_out * d_in),
        "target_compression": float(budget.sparsity),
        "lowrank_share": b.rank * (d_out + d_in) / kept if kept else 0.0,
        "oats_objective": res.objective[-1] if res.objective else None,
        "svd": _get(cfg, "svd"),
    }
    if res.subspace_steps:
        info["subspace_steps_mean"] = sum(res.subspace_steps) / len(res.subspace_steps)
    return CompressedWeight(sparse=res.sparse, U=res.U, V=res.V, info=info)

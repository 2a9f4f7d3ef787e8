"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, per output row by default.

The score is the weight magnitude times the l2 norm of its input feature over all calibration
tokens. The reference (locuslab/wanda ``prune_wanda``) ranks scores within each output row (the
paper's "per output" comparison group) and removes ``floor(d_in * sparsity)`` of every row; the
per-layer variant (`mask_scope: layer`) ranks the whole matrix; N:M keeps the N best of every M
consecutive inputs of each row. No weight is updated.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from baselines.masks import select_mask
from oats.interface import Budget, CompressedWeight, InputStats, Method


def wanda_scores(weight: Tensor, col_norms: Tensor) -> Tensor:
    """[out, in] weight, [in] ||X_j||_2 -> [out, in] scores |W_ij| * ||X_j||_2 (float32 or wider)."""
    if col_norms.shape != (weight.shape[1],):
        raise ValueError(f"col_norms has shape {tuple(col_norms.shape)}; expected ({weight.shape[1]},)")
    return weight.abs() * col_norms.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))[None, :]


def wanda_mask(weight: Tensor, col_norms: Tensor, budget: Budget) -> Tensor:
    """Boolean [out, in] mask (True = kept) at the budget's sparsity: N:M, or per row (default) / per layer."""
    return select_mask(wanda_scores(weight, col_norms), budget, default_scope="row")


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    if stats is None:
        raise ValueError("wanda needs input statistics (the registry asks the pipeline for stats='diag')")
    mask = wanda_mask(weight, stats.col_norms, budget)
    return CompressedWeight(dense=weight * mask, mask=mask, info={"mask_scope": "nm" if budget.nm else (budget.scope or "row")})


METHOD = Method("wanda", compress_weight, stats="diag",
                workspace=lambda d_out, d_in, cfg: d_out * d_in * (4 + 8 + 1),  # scores, their sort order, the mask
                doc="keep the largest `|W_ij|·‖X_j‖₂`, per output row (`mask_scope: layer` per layer), or N:M",
                paper="Sun et al. 2023")

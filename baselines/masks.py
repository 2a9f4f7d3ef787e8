"""Mask selection from importance scores: per row, per layer, and N:M. Pure tensor functions.

Every mask here is boolean, True = kept, with the exact count the budget asks for (ties broken by
``torch.topk``'s order, so counts never drift).
"""
from __future__ import annotations

import torch
from torch import Tensor

from oats.interface import Budget


def n_pruned(count: int, sparsity: float) -> int:
    """Weights removed out of ``count`` at ``sparsity`` (the Wanda/SparseGPT convention: floor)."""
    return int(count * sparsity)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """[out, in] scores -> mask keeping the in - floor(in*sparsity) highest scores of every row."""
    d_in = scores.shape[1]
    k_keep = d_in - n_pruned(d_in, sparsity)
    return keep_topk_rows(scores, k_keep)


def keep_topk_rows(scores: Tensor, k_keep: int) -> Tensor:
    """[out, in] -> mask with exactly ``k_keep`` True per row (the largest scores)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k_keep <= 0:
        return mask
    idx = torch.topk(scores, k_keep, dim=1, sorted=False).indices
    return mask.scatter_(1, idx, True)


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """[out, in] scores -> mask keeping numel - floor(numel*sparsity) highest scores of the whole layer."""
    k_keep = scores.numel() - n_pruned(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k_keep > 0:
        mask[torch.topk(scores.flatten(), k_keep, sorted=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """[out, in] scores -> mask keeping the n highest of every m consecutive inputs (in % m == 0)."""
    d_out, d_in = scores.shape
    if d_in % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs the input dimension ({d_in}) to be a multiple of M={m}")
    groups = scores.reshape(d_out, d_in // m, m)
    idx = torch.topk(groups, n, dim=2, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(d_out, d_in)


def select_mask(scores: Tensor, budget: Budget, default_scope: str) -> Tensor:
    """The mask a budget asks for: N:M if set, else unstructured per row or per layer."""
    if budget.nm is not None:
        return nm_mask(scores, *budget.nm)
    scope = budget.scope or default_scope
    if scope == "row":
        return row_mask(scores, budget.sparsity)
    if scope == "layer":
        return layer_mask(scores, budget.sparsity)
    raise ValueError(f"mask scope {scope!r}; allowed: 'row', 'layer'")

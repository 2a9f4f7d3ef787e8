"""Magnitude pruning: keep the largest |W_ij| (per layer by default, as in the Wanda reference code)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from baselines.masks import select_mask
from oats.interface import Budget, CompressedWeight, InputStats, Method


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    mask = select_mask(weight.abs(), budget, default_scope="layer")
    return CompressedWeight(dense=weight * mask)


METHOD = Method("magnitude", compress_weight, stats="none",
                workspace=lambda d_out, d_in, cfg: d_out * d_in * (4 + 8 + 1),  # |W|, its sort order, the mask
                doc="keep the largest `|W_ij|`, per layer (`mask_scope: row` per row), or N:M")

"""No compression: the reference row. The pipeline skips calibration and the compressing pass for it."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from oats.interface import Budget, CompressedWeight, InputStats, Method


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    return CompressedWeight(dense=weight)


METHOD = Method("dense", compress_weight, stats="none", doc="no compression (the reference row)", compresses=False,
                produces_mask=False, supports_layerwise=False, label=lambda cfg: "dense")

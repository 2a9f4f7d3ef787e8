"""No compression: the pipeline skips the compressing pass entirely for this method."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from oats.interface import Budget, CompressedWeight, InputStats


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    return CompressedWeight(dense=weight)

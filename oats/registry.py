"""The one table of methods (plus layerwise allocators and weight updates). A new method is one file
and one line here; config validation reads these tables."""
from __future__ import annotations

from typing import Callable

from baselines import dense, magnitude
from oats.interface import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dense", dense.compress_weight, stats="none", doc="no compression (reference)", supports_owl=False, supports_update=False),
        Method("magnitude", magnitude.compress_weight, stats="none", doc="keep the largest |W| (per layer; `mask_scope: row` per row)"),
    ]
}

# layerwise: name -> fn(model, block0_inputs, cfg, device) -> per-block sparsity list ('uniform' is built in)
LAYERWISE: dict[str, Callable] = {}

# update: name -> fn(weight, compressed_weight, stats, cfg) -> CompressedWeight with the same mask
UPDATES: dict[str, Callable] = {}

"""The one table of methods (plus layerwise allocators and weight updates). A new method is one file
and one line here; config validation reads these tables."""
from __future__ import annotations

from typing import Callable

from baselines import dense, magnitude, owl, sparsegpt, wanda
from baselines import optima
from oats.interface import Method
from oats import oats_method

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("dense", dense.compress_weight, stats="none", doc="no compression (reference)", supports_owl=False, supports_update=False),
        Method("magnitude", magnitude.compress_weight, stats="none", doc="keep the largest |W| (per layer; `mask_scope: row` per row)"),
        Method("oats", oats_method.compress_weight, stats="diag", doc="OATS: sparse + low-rank of W diag(sqrt D) by alternating thresholding (`sparsity` = compression rate, `rank_ratio`, `num_iters`, `svd`, `compress`)", supports_update=False),
        Method("wanda", wanda.compress_weight, stats="diag", doc="Wanda: keep the largest |W_ij|*||X_j|| (per row; `mask_scope: layer` per layer)"),
        Method("sparsegpt", sparsegpt.compress_weight, stats="gram", doc="SparseGPT: OBS updates with H = 2X^TX, adaptive mask per column block"),
    ]
}

# layerwise: name -> fn(model, block0_inputs, cfg, device) -> per-block sparsity list ('uniform' is built in)
LAYERWISE: dict[str, Callable] = {"owl": owl.owl_layerwise}

# update: name -> fn(weight, compressed_weight, stats, cfg) -> CompressedWeight with the same mask
UPDATES: dict[str, Callable] = {"optima": optima.update}

"""OWL (Yin et al. 2024): outlier-weighted layerwise sparsity.

A statistics pass streams the *dense* model once (``oats.pipeline.stream`` with diagonal statistics,
nothing modified) and measures each block's layerwise outlier distribution (LOD): the share of the
Wanda scores ``|W_ij| * ||X_j||_2`` of all the block's linear layers, taken together, that exceed
``M`` times their mean (reference: ``check_outlier_mean`` in luuyin/OWL ``lib/prune_all.py``).
Blocks with more outliers keep more weights:

    a_l   = (D_l - min D) / (max D - min D) * 2 * lambda      (reference: in [0, 2 lambda])
    s_l   = target - (a_l - mean(a))                           (reference: 1 - (a_l - mean a + 1 - target))

so the mean sparsity is exactly the target. The reference's band is 2 lambda wide but not centred on
the target (the mean of ``a`` need not be its midpoint), so one block can land up to 2 lambda away. The
paper states ``s_l in [target - lambda, target + lambda]``; we keep that bound: when a block would fall
outside it, all deviations ``a_l - mean(a)`` are shrunk by one common factor until the farthest sits at
exactly lambda. The allocation then is still linear in the LOD, ordered the same way, and its mean is
still the target; whenever the reference already stays within +-lambda the two are identical
(``owl_sparsities(..., bounded=False)`` gives the reference's numbers unchanged).

``owl_layerwise`` returns the per-block sparsities (an ``Allocation``); the compressing pass then starts again from the same
captured block-0 inputs (streaming never mutates them) and hands each block's sparsity to the method
through ``Budget.sparsity`` (for OATS: the block's compression rate).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from baselines.wanda import wanda_scores
from oats.interface import Allocation, Layerwise, StreamDense
from oats.keys import ConfigError, Key, KeyTable, interval, positive

log = logging.getLogger(__name__)


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction (0..1) of all entries of ``scores`` (any shapes, taken together) above ``m`` times their mean."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        return 0.0
    threshold = m * total / count
    return sum(int((s.double() > threshold).sum()) for s in scores) / count


def owl_sparsities(lod: Sequence[float], target: float, lam: float, bounded: bool = True) -> list[float]:
    """Per-block sparsities from the per-block outlier ratios ``lod`` (any positive scale).

    More outliers -> lower sparsity. The mean is ``target``; with ``bounded`` every value lies in
    [target - lam, target + lam] (see the module docstring); ``bounded=False`` is the reference formula.
    All-equal LOD (no signal) gives the uniform ``target``.
    """
    d = torch.tensor(list(lod), dtype=torch.float64)
    if d.numel() == 0:
        return []
    spread = float(d.max() - d.min())
    if spread == 0.0:
        return [float(target)] * d.numel()
    a = (d - d.min()) / spread * (2.0 * lam)
    dev = a - a.mean()
    if bounded:
        far = float(dev.abs().max())
        if far > lam:
            dev = dev * (lam / far)
    return [float(v) for v in (target - dev)]


@torch.no_grad()
def block_lod(layers: dict[str, nn.Linear], collector: Any, m: float) -> float:
    """LOD of one block: the outlier share of the Wanda scores of all its linear layers together."""
    scores = [wanda_scores(layer.weight.detach().float(), collector.stats(name).col_norms) for name, layer in layers.items()]
    return outlier_ratio(scores, m)


def owl_layerwise(stream_dense: StreamDense, n_blocks: int, cfg: Any) -> Allocation:
    """``layerwise: owl``: stream the dense model once, measure each block's LOD, allocate sparsities."""
    t0 = time.perf_counter()
    lod: list[float] = []

    def on_block(i: int, block: nn.Module, layers: dict[str, nn.Linear], collector: Any, inputs: Any = None) -> None:
        lod.append(block_lod(layers, collector, float(cfg.owl_m)))

    stream_dense("diag", on_block, "OWL statistics (dense)")
    if len(lod) != n_blocks:
        raise RuntimeError(f"OWL: measured {len(lod)} blocks of {n_blocks}")
    sparsities = owl_sparsities(lod, float(cfg.sparsity), float(cfg.owl_lambda))
    log.info("OWL: LOD %s -> block sparsities %s", [round(x, 4) for x in lod], [round(s, 4) for s in sparsities])
    info = {
        "name": "owl",
        "owl_m": float(cfg.owl_m),
        "owl_lambda": float(cfg.owl_lambda),
        "lod": lod,
        "reference_sparsity": owl_sparsities(lod, float(cfg.sparsity), float(cfg.owl_lambda), bounded=False),
        "seconds": time.perf_counter() - t0,  # the dense statistics pass (the runner counts it under calibration)
    }
    return Allocation(sparsities, info)


KEYS = KeyTable({
    "owl_m": Key(5.0, (float, int), "OWL outlier threshold M: a Wanda score is an outlier above M times its layer's mean", positive),
    "owl_lambda": Key(0.08, (float, int), "OWL: per-block sparsities spread within +-lambda of the target", interval(0.0, 1.0)),
})


def validate(cfg: Any) -> None:
    if cfg["sparsity_type"] != "unstructured":
        raise ConfigError("layerwise", f"'owl' sets a sparsity per block, which an N:M pattern ({cfg['sparsity_type']}) fixes; "
                          f"allowed with 'owl': sparsity_type 'unstructured'")
    lam = cfg["owl_lambda"]
    if not (0.0 <= cfg["sparsity"] - lam and cfg["sparsity"] + lam < 1.0):
        raise ConfigError("owl_lambda", f"sparsity {cfg['sparsity']} +- owl_lambda {lam} must stay inside [0, 1)")


LAYERWISE = Layerwise("owl", owl_layerwise, stats="diag", keys=KEYS, validate=validate,
                      doc="per-block sparsities from each block's outlier share (unstructured)", paper="Yin et al. 2024 (OWL)")

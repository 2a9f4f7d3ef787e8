"""Compress a whole model: the pipeline's per-block callback that hands every linear layer to the
method, applies the optional weight update, writes the answer back, and records per-layer facts."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from oats.config import parse_nm
from oats.interface import Budget, CompressedWeight, InputStats
from oats.models import get_blocks, set_module
from oats.pipeline import BlockInputs, StatsCollector, stream
from oats.registry import LAYERWISE, METHODS, UPDATES

log = logging.getLogger(__name__)

_STATS_ORDER = {"none": 0, "diag": 1, "gram": 2}


def stats_kind_for(cfg: Any) -> str:
    """The statistics a run needs: the method's, at least the diagonal (for the error report), a Gram for updates."""
    kind = METHODS[cfg.method].stats
    if cfg["update"] != "none":  # item access: ConfigDict.update is the dict method
        kind = "gram"
    return max(kind, "diag", key=_STATS_ORDER.__getitem__)


def scaled_relative_error(weight: Tensor, approx: Tensor, stats: InputStats | None) -> float | None:
    """||(W - W_hat) diag(sqrt D)||_F / ||W diag(sqrt D)||_F, D the input second moments."""
    if stats is None:
        return None
    s = stats.second_moment.to(weight.device, torch.float64).sqrt()
    num = ((weight.double() - approx.double()) * s).norm()
    den = (weight.double() * s).norm()
    return float(num / den) if den > 0 else 0.0


def block_sparsities(model: nn.Module, inputs: BlockInputs, cfg: Any, device: torch.device) -> list[float]:
    """Per-block target sparsity: uniform, or from a layerwise allocator (OWL) that may stream the dense model."""
    n = len(get_blocks(model))
    if cfg.layerwise == "uniform":
        return [float(cfg.sparsity)] * n
    return LAYERWISE[cfg.layerwise](model, inputs, cfg, device)


def compress_model(
    model: nn.Module,
    inputs: BlockInputs,
    cfg: Any,
    device: torch.device,
    sparsities: list[float],
    start_block: int = 0,
    after_block: Callable[[int, nn.Module, BlockInputs], None] | None = None,
    records: list[dict[str, Any]] | None = None,
    before_block: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Compress every linear layer of every block from ``start_block`` on, in place. Returns per-layer records.

    ``records``: a list the per-layer records are appended to as each layer finishes (a checkpoint
    saved from ``after_block`` reads it); ``before_block(i)`` runs before block i is touched (lazy loading).
    """
    method = METHODS[cfg.method]
    update = UPDATES.get(cfg["update"])  # not cfg.update: that is ConfigDict's dict method
    nm = parse_nm(cfg.sparsity_type)
    records = [] if records is None else records
    stats_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32

    def on_block(i: int, block: nn.Module, layers: dict[str, nn.Linear], collector: StatsCollector | None) -> None:
        budget = Budget(sparsity=sparsities[i], nm=nm, scope=cfg.mask_scope)
        for name, layer in layers.items():
            t0 = time.perf_counter()
            weight = layer.weight.data.float().clone()  # .float() aliases a float32 weight, which copy_ below overwrites
            stats = collector.stats(name) if collector is not None else None
            cw: CompressedWeight = method.compress(weight, stats, budget, cfg)
            if update is not None:
                cw = update(weight, cw, stats, cfg)
            approx = cw.to_dense()
            if cw.is_factored and cfg.compress:
                from oats.compressed import SparseLowRankLinear

                set_module(block, name, SparseLowRankLinear.from_factors(cw.sparse, cw.U, cw.V, layer.bias, dtype=layer.weight.dtype))
            else:
                layer.weight.data.copy_(approx.to(layer.weight.dtype))
            kept = cw.param_count()
            rec = {
                "layer": f"{i}.{name}",
                "block": i,
                "shape": list(weight.shape),
                "target_sparsity": budget.sparsity,
                "kept_params": kept,
                "sparsity": 1.0 - kept / weight.numel(),
                "scaled_rel_error": scaled_relative_error(weight, approx, stats),
                "seconds": time.perf_counter() - t0,
                **cw.info,
            }
            records.append(rec)
            log.debug("%s: sparsity %.4f, error %s", rec["layer"], rec["sparsity"], rec["scaled_rel_error"])

    stream(model, inputs, device, stats_kind_for(cfg), on_block, stats_dtype, start_block, after_block, desc=f"compress ({cfg.method})", before_block=before_block)
    return records

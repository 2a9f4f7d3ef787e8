"""Compress a whole model: the pipeline's per-block callback that hands every logical matrix of a
block to the method, applies the selected weight update and block update, writes the answers back
(fused layers stacked again) and records per-matrix facts. It names no plugin: what to do comes from
the declarations the config selects (``oats.config.selected_plugins``)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from factored.module import SparseLowRankLinear, set_module
from oats.architectures import Matrix, architecture_of, check_fused_rows, fused_order, get_blocks, matrices
from oats.config import selected_plugins
from oats.interface import BLOCK_TARGETS, STATS_KINDS, BlockChain, Budget, CompressedWeight, InputStats
from oats.keys import parse_nm
from oats.pipeline import BlockInputs, StatsCollector, WeightSource, run_block, stream

log = logging.getLogger(__name__)


def stats_kind_for(cfg: Any) -> str:
    """The statistics a run needs: the most any selected plugin asks for, at least the diagonal (for the error report)."""
    kinds = [p.stats for kind, p in selected_plugins(cfg).items() if hasattr(p, "stats")]
    return max(["diag", *kinds], key=STATS_KINDS.index)


def stats_device_for(cfg: Any, device: torch.device) -> torch.device:
    """Where the calibration hidden states and statistics live (``stats_device``; default ``device``)."""
    return device if cfg.get("stats_device") is None else torch.device(cfg.stats_device)


def scaled_relative_error(weight: Tensor, approx: Tensor, stats: InputStats | None) -> float | None:
    """||(W - W_hat) diag(sqrt D)||_F / ||W diag(sqrt D)||_F, D the input second moments."""
    if stats is None:
        return None
    s = stats.second_moment.to(weight.device, torch.float64).sqrt()
    num = ((weight.double() - approx.double()) * s).norm()
    den = (weight.double() * s).norm()
    return float(num / den) if den > 0 else 0.0


def _layer_record(i: int, m: Matrix, weight: Tensor, cw: CompressedWeight, target: float, stats: InputStats | None, seconds: float) -> dict[str, Any]:
    kept = cw.param_count()
    return {
        "layer": f"{i}.{m.name}",
        "block": i,
        "shape": list(weight.shape),
        "target_sparsity": target,
        "kept_params": kept,
        "sparsity": 1.0 - kept / weight.numel(),
        "scaled_rel_error": scaled_relative_error(weight, cw.to_dense(), stats),
        "seconds": seconds,
        **cw.info,
    }


def compress_model(
    model: nn.Module,
    inputs: BlockInputs,
    cfg: Any,
    device: torch.device,
    sparsities: list[float],
    start_block: int = 0,
    after_block: Callable[[int, nn.Module, BlockInputs], None] | None = None,
    records: list[dict[str, Any]] | None = None,
    weights: WeightSource | None = None,
) -> list[dict[str, Any]]:
    """Compress every selected matrix of every block from ``start_block`` on, in place. Returns per-matrix records.

    ``records``: a list the per-matrix records are appended to as each block finishes (a checkpoint
    saved from ``after_block`` reads it); ``weights`` loads and frees blocks read lazily (``oats.pipeline.stream``).
    """
    plugins = selected_plugins(cfg)
    method, update, block_update = plugins["method"], plugins.get("weight_update"), plugins.get("block_update")
    arch = architecture_of(model)
    nm = parse_nm(cfg.sparsity_type)
    records = [] if records is None else records
    stats_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
    target = block_update.target(cfg) if block_update is not None and block_update.target is not None else "dense_block"
    if target not in BLOCK_TARGETS:
        raise ValueError(f"block update {block_update.name!r} asks for targets {target!r}; allowed: {BLOCK_TARGETS}")
    window = int(block_update.window(cfg)) if block_update is not None and block_update.window is not None else 1
    wants_dense_inputs = block_update is not None and block_update.dense_inputs is not None and bool(block_update.dense_inputs(cfg))
    n_blocks = len(get_blocks(model))
    if window < 1:
        raise ValueError(f"block update {block_update.name!r} asks for a window of {window} blocks")
    if window > 1 and start_block > 0:
        raise ValueError("a block update fitting several blocks together cannot resume from a block checkpoint; set checkpoint_blocks False")
    if window > 1 and getattr(weights, "lazy", False):
        raise ValueError("a block update fitting several blocks together needs the earlier blocks of its window, which lazy_load frees; "
                         "set lazy_load False")
    # the dense model's own activations, streamed beside the compressed ones (block i still holds its
    # dense weights when on_block runs, so one more forward per batch gives its dense outputs): the
    # targets of 'dense_model', and the inputs a block update asks for with dense_inputs
    dense_hidden: list[Tensor] | None = None
    if target == "dense_model" or wants_dense_inputs:
        if start_block > 0:
            raise ValueError("a block update matching the dense model's activations cannot resume from a block checkpoint "
                             "(the dense stream is not saved); set checkpoint_blocks False")
        dense_hidden = list(inputs.hidden)
    # the open window (window > 1): its inputs, the dense model's inputs of its first block, the dense
    # window's outputs on its inputs (the 'dense_block' targets) and its blocks compressed so far
    win: dict[str, Any] = {}

    def on_block(i: int, block: nn.Module, layers: dict[str, nn.Linear], collector: StatsCollector | None,
                 block_inputs: BlockInputs) -> BlockInputs | None:
        nonlocal dense_hidden
        budget = Budget(sparsity=sparsities[i], nm=nm, scope=cfg.mask_scope)
        chosen = matrices(i, block, arch, model.config, cfg.targets, cfg.ignore)
        answers: dict[str, list[tuple[Matrix, CompressedWeight]]] = {}
        block_records: list[dict[str, Any]] = []
        for m in chosen:
            t0 = time.perf_counter()
            layer = layers[m.linear]
            weight = m.weight(layer).float().clone()  # .float() aliases a float32 weight, which the write-back overwrites
            stats = collector.stats(m.linear) if collector is not None else None
            cw = method.compress(weight, stats, budget, cfg)
            if update is not None:
                if cw.is_factored and not update.supports_factored:
                    raise ValueError(f"weight_update {update.name!r} cannot update the sparse + low-rank answers of method {method.name!r}")
                cw = update.apply(weight, cw, stats, cfg)
            answers.setdefault(m.linear, []).append((m, cw))
            block_records.append(_layer_record(i, m, weight, cw, budget.sparsity, stats, time.perf_counter() - t0))
        merged = {name: _merge(layers[name], parts, name) for name, parts in answers.items()}
        dense_in = dense_hidden
        if dense_hidden is not None:
            dense_hidden = [run_block(block, h, block_inputs.kwargs_for(h), device) for h in dense_hidden]
        fused = {n: len(p) > 1 for n, p in answers.items()}
        if block_update is not None and window > 1:
            return _window_block(i, block, layers, merged, fused, block_records, block_inputs, dense_in)
        if block_update is not None:
            t0 = time.perf_counter()
            targets = dense_hidden if target == "dense_model" else [run_block(block, h, block_inputs.kwargs_for(h), device) for h in block_inputs.hidden]
            extra = {"dense_hidden": dense_in} if wants_dense_inputs else {}
            updated, info = block_update.apply(block, dict(merged), block_inputs.hidden, block_inputs.kwargs_for, targets, cfg, device, **extra)
            kept = _check_masks_kept(merged, updated, fused)
            merged = updated
            block_records[0]["block_update"] = {"name": block_update.name, **info, "seconds": time.perf_counter() - t0}
            for r in block_records:
                r["kept_params_after_block_update"] = kept[r["layer"].split(".", 1)[1].split(":")[0]]
        for name, cw in merged.items():
            _write_back(block, name, layers[name], cw, method, cfg)
        _finish(block_records)
        return None

    def _finish(block_records: list[dict[str, Any]]) -> None:
        for r in block_records:
            log.debug("%s: sparsity %.4f, error %s", r["layer"], r["sparsity"], r["scaled_rel_error"])
        records.extend(block_records)

    def _window_block(i: int, block: nn.Module, layers: dict[str, nn.Linear], merged: dict[str, CompressedWeight],
                      fused: dict[str, bool], block_records: list[dict[str, Any]], block_inputs: BlockInputs,
                      dense_in: list[Tensor] | None) -> BlockInputs | None:
        """Block i of a window of several: compressed like any block; at the window's last block, the block
        update fits the whole window and the window's blocks are written back."""
        if i % window == 0:
            win.clear()
            win.update(inputs=block_inputs, dense_inputs=dense_in, outputs=list(block_inputs.hidden), blocks=[])
        if target == "dense_block":  # the dense window on the window's inputs, block by block (block i is still dense)
            win["outputs"] = [run_block(block, h, block_inputs.kwargs_for(h), device) for h in win["outputs"]]
        win["blocks"].append((block, layers, merged, fused, block_records))
        if i % window != window - 1 and i != n_blocks - 1:
            # until the window closes, the block runs with its answers' dense weights (its outputs feed
            # the next block's statistics); its own weights are put back for the block update
            saved = {name: layers[name].weight.detach().clone() for name in merged}
            win["blocks"][-1] += (saved,)
            for name, cw in merged.items():
                layers[name].weight.data.copy_(cw.to_dense().to(layers[name].weight.dtype))
            return None
        t0 = time.perf_counter()
        parts = win["blocks"]
        for b, lay, _, _, _, *saved in parts[:-1]:
            for name, w in saved[0].items():
                lay[name].weight.data.copy_(w)
            b.to(device)
        chain = BlockChain([p[0] for p in parts])
        answers = {f"{k}.{name}": cw for k, p in enumerate(parts) for name, cw in p[2].items()}
        targets = dense_hidden if target == "dense_model" else win["outputs"]
        extra = {"dense_hidden": win["dense_inputs"]} if wants_dense_inputs else {}
        start: BlockInputs = win["inputs"]
        updated, info = block_update.apply(chain, dict(answers), start.hidden, start.kwargs_for, targets, cfg, device, **extra)
        first = i - len(parts) + 1
        info = {"name": block_update.name, **info, "window_blocks": [first, i], "seconds": time.perf_counter() - t0}
        hidden = list(start.hidden)
        for k, (b, lay, merged_k, fused_k, recs, *_) in enumerate(parts):
            mine = {name: updated.get(f"{k}.{name}") for name in merged_k}
            kept = _check_masks_kept(merged_k, mine, fused_k)
            recs[0]["block_update"] = info
            for r in recs:
                r["kept_params_after_block_update"] = kept[r["layer"].split(".", 1)[1].split(":")[0]]
            for name, cw in mine.items():
                _write_back(b, name, lay[name], cw, method, cfg)
            _finish(recs)
            if k < len(parts) - 1:
                hidden = [run_block(b, h, start.kwargs_for(h), device) for h in hidden]
                b.to("cpu")
        win.clear()
        return BlockInputs(hidden, block_inputs.kwargs)

    stream(model, inputs, device, stats_kind_for(cfg), on_block, stats_dtype, start_block, after_block,
           desc=f"compress ({cfg.method})", weights=weights, stats_device=stats_device_for(cfg, device))
    return records


def _merge(layer: nn.Linear, parts: list[tuple[Matrix, CompressedWeight]], name: str) -> CompressedWeight:
    """One answer for a linear layer from its logical matrices' answers (a fused layer's parts stacked back)."""
    if len(parts) == 1 and parts[0][0].rows is None:
        return parts[0][1]
    check_fused_rows(layer, [(m.name, m.rows) for m, _ in parts], name)
    stacked = CompressedWeight.stack_rows([cw for _, cw in parts])
    order = fused_order([m for m, _ in parts])
    return stacked if order is None else stacked.take_rows(order)


def _mask(cw: CompressedWeight) -> Tensor:
    return cw.mask.bool() if cw.mask is not None else ((cw.sparse if cw.is_factored else cw.dense) != 0)


def _check_masks_kept(before: dict[str, CompressedWeight], after: dict[str, CompressedWeight], fused: dict[str, bool]) -> dict[str, int]:
    """A block update must keep every mask bit for bit (pruned stays exactly zero) and, for a fused
    layer's block-diagonal U, its zero blocks. Returns each layer's kept parameters counted again."""
    kept = {}
    for name, old in before.items():
        new = after.get(name)
        if new is None or new.is_factored != old.is_factored:
            raise RuntimeError(f"block update returned no answer of the same kind for {name}")
        values = new.sparse if new.is_factored else new.dense
        if bool((values[~_mask(old).to(values.device)] != 0).any()):
            raise RuntimeError(f"block update changed the mask of {name}: pruned weights became nonzero")
        if new.is_factored and (new.U.shape != old.U.shape or new.V.shape != old.V.shape):
            raise RuntimeError(f"block update changed the rank of {name}")
        if new.is_factored and fused[name] and bool((new.U[old.U.to(new.U.device) == 0] != 0).any()):
            raise RuntimeError(f"block update filled the zero blocks of {name}'s block-diagonal U")
        kept[name] = int((values != 0).sum()) + (new.U.numel() + new.V.numel() if new.is_factored and not fused[name] else 0)
        if new.is_factored and fused[name]:
            kept[name] += int((old.U != 0).sum()) + new.V.numel()
    return kept


def factored_layers(cfg: Any) -> bool:
    """Whether the compressed linears are held as the method's factored modules: compress mode, or a
    model update (which trains their factors; ``oats.model_update`` merges them back without compress mode)."""
    return bool(cfg.get("compress")) or cfg.get("model_update", "none") != "none"


def _write_back(block: nn.Module, name: str, layer: nn.Linear, cw: CompressedWeight, method: Any, cfg: Any) -> None:
    """Compress mode or a model update (:func:`factored_layers`, for a method with a factored module):
    the method's module takes the linear's place; otherwise the dense weight is written back into the linear.
    Under a model update a dense (pruned) answer is held as a rank-0 ``SparseLowRankLinear`` (its nonzeros
    the mask), so the update sees every compressed linear (the config allows this only for updates that
    train the sparse values)."""
    module = method.build_module(cw, layer, cfg) if method.build_module is not None and factored_layers(cfg) else None
    if module is None and cfg.get("model_update", "none") != "none":
        dense = cw.to_dense()
        module = SparseLowRankLinear.from_factors(dense, dense.new_zeros(layer.out_features, 0), dense.new_zeros(0, layer.in_features),
                                                  layer.bias, dtype=layer.weight.dtype)
    if module is not None:
        set_module(block, name, module)
    else:
        layer.weight.data.copy_(cw.to_dense().to(layer.weight.dtype))

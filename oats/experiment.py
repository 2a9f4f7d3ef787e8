"""One experiment's lifecycle, whatever holds the weights and whatever the modality: load, resume or
calibrate and allocate (``calibrate``), compress block by block with checkpoints (``compress``),
evaluate (the modality's task, ``oats.tasks``), keep the model and export it (``keep_model``), record.

The weights come from a source (``oats.weights``): the model in memory, or its safetensors shards read
block by block (``lazy_load``). The lifecycle is the same code for both; the lazy source only loads
and frees around each block and writes each compressed block to its own output shard.
"""
from __future__ import annotations

import logging
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from oats.config import config_hash, selected_plugins
from oats.interface import Allocation, DenseTargets, UpdateStore
from oats.pipeline import BlockInputs, capture_inputs, stream
from oats.tasks import Task

log = logging.getLogger(__name__)

MODEL_DIR = "model"
EXPORT_DIR = "export"
MODEL_MARKER = "OATS_MODEL"  # written into every model folder the runner makes; only such folders are ever deleted


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from oats import __version__

        out["oats"] = __version__
        out["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except Exception:  # pragma: no cover - git missing
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB: Linux's ``VmHWM`` (this program's own high-water
    mark), else ``ru_maxrss``, which Linux carries across fork and exec, so a run started from a bigger
    process would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def start_experiment(cfg: Any) -> tuple[float, torch.device]:
    """(start time, compute device) of an experiment: threads set, peak-memory counters reset, torch seeded."""
    from oats.models import resolve_device

    t_all = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.seed)
    return t_all, device


def finish_record(record: dict[str, Any], timings: dict[str, float], t_all: float, device: torch.device,
                  layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Add total time, peak memory and the per-layer records to an experiment's record."""
    timings["total"] = time.perf_counter() - t_all
    record["timings"] = timings
    record["peak_memory_mb"] = {"cpu_rss": peak_rss_mb()}
    if device.type == "cuda":
        record["peak_memory_mb"]["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    record["layers"] = layers
    return record


def open_weights(cfg: Any):
    """(tokenizer, weight source, local model directory or None) for the config's model (an image
    transformer has no tokenizer: None)."""
    from oats.vision_models import is_vision_model

    if is_vision_model(cfg.model):
        if cfg.lazy_load:
            raise ValueError("config key 'lazy_load': not supported for vision models (they fit in memory); set it False")
        from oats.vision_models import load_vision_model
        from oats.weights import InMemoryWeights

        return None, InMemoryWeights(load_vision_model(cfg.model, cfg.dtype)), None
    if cfg.lazy_load:
        from transformers import AutoTokenizer

        from oats.weights import LazyModel, local_model_dir

        src = local_model_dir(cfg.model)
        return AutoTokenizer.from_pretrained(src), LazyModel.from_dir(src, cfg.dtype), src
    from oats.models import load_model
    from oats.weights import InMemoryWeights

    model, tokenizer = load_model(cfg.model, cfg.dtype)
    return tokenizer, InMemoryWeights(model), None


def block_sparsities(weights: Any, inputs: BlockInputs, cfg: Any, device: torch.device) -> Allocation:
    """Per-block target sparsity: uniform, or from the selected layerwise plugin, which streams the
    dense model (loaded block by block when the weights are lazy)."""
    from oats.architectures import get_blocks
    from oats.compressor import stats_device_for

    n = len(get_blocks(weights.model))
    layerwise = selected_plugins(cfg).get("layerwise")
    if layerwise is None:
        return Allocation.uniform(cfg.sparsity, n)
    stats_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32

    def stream_dense(kind: str, on_block: Callable[..., None], desc: str) -> None:
        stream(weights.model, inputs, device, kind, on_block, stats_dtype, desc=desc, weights=weights,
               stats_device=stats_device_for(cfg, device))

    allocation = layerwise.allocate(stream_dense, n, cfg)
    if not isinstance(allocation, Allocation) or len(allocation.sparsities) != n:
        raise TypeError(f"layerwise {layerwise.name!r} must return an Allocation of {n} block sparsities")
    return allocation


@dataclass
class Calibrated:
    """Where compression starts: block ``start_block``'s inputs, the records of the blocks already done
    (a resumed run) and the per-block allocation."""

    inputs: BlockInputs
    layers: list[dict[str, Any]]
    allocation: Allocation
    start_block: int = 0
    dense_targets: DenseTargets | None = None  # the model update's, recorded on the dense model
    model_update: dict[str, Any] | None = None  # what the model update did (the record's entry)


def calibrate(cfg: Any, task: Task, weights: Any, device: torch.device, ckpt: Any) -> Calibrated:
    """A killed run's checkpoint (finished blocks back in), else the calibration inputs of block 0 and
    the allocation."""
    from oats.checkpoint import set_rng_state
    from oats.compressor import stats_device_for

    update = selected_plugins(cfg).get("model_update")
    resumed = ckpt.load(device) if ckpt is not None else None
    if resumed is not None:
        targets = None
        if update is not None:
            from oats.model_update import load_targets

            targets = load_targets(ckpt.dir)
        if update is None or targets is not None:
            if not weights.lazy:  # lazy: the finished blocks are already in their output shards
                ckpt.restore_blocks(weights.model, resumed.last_block)
            set_rng_state(resumed.rng)
            return Calibrated(resumed.inputs.to(stats_device_for(cfg, device)), resumed.records,
                              Allocation(list(resumed.sparsities), resumed.layerwise_info or {}), resumed.last_block + 1, targets)
        log.warning("checkpoint of %s has no dense targets for the model update; starting over", cfg.name)
    ids = task.calibration_inputs()
    task.prepare_reference()  # on the dense model, before anything is compressed
    targets = None
    if update is not None:
        from oats.model_update import dense_targets, save_targets

        update_ids = task.update_inputs()  # None: the update trains on the calibration windows
        targets = dense_targets(weights.model, ids if update_ids is None else update_ids, int(update.topk(cfg)),
                                device)  # one window at a time: its logits are vocab-wide
        if ckpt is not None:
            save_targets(targets, ckpt.dir)
    weights.load_head()
    inputs = capture_inputs(weights.model, ids, device, cfg.cal_batch_size, hidden_device=stats_device_for(cfg, device))
    weights.free_head()
    return Calibrated(inputs, [], block_sparsities(weights, inputs, cfg, device), dense_targets=targets)


def compress(cfg: Any, weights: Any, cal: Calibrated, ckpt: Any, exp_dir: Path, src: Path | None, tokenizer: Any,
             device: torch.device) -> tuple[Any, Path | None]:
    """Compress every block from ``cal.start_block`` on (records appended to ``cal.layers``). Lazy
    weights: each block is written to its own output shard as it finishes. Returns the weights to
    evaluate and the model's local directory (the written shards when lazy)."""
    from oats.compressor import compress_model

    writer, model_dir = None, src
    if weights.lazy:
        from oats.weights import ShardWriter

        model_dir = exp_dir / MODEL_DIR
        writer = ShardWriter(model_dir, weights)
        (model_dir / MODEL_MARKER).touch()
    save = ckpt.after_block_fn(cal.layers, cal.allocation.sparsities, cal.allocation.info) if ckpt is not None else None

    def after_block(i: int, block: nn.Module, next_inputs: BlockInputs) -> None:
        if writer is not None:
            writer.write_block(i, block)  # the shard first: a checkpoint must never point past it
        if save is not None:
            save(i, block, next_inputs)

    compress_model(weights.model, cal.inputs, cfg, device, cal.allocation.sparsities, start_block=cal.start_block,
                   after_block=after_block, records=cal.layers, weights=weights)
    if writer is None:
        update_model(cfg, weights.model, cal, device, ckpt.update_store() if ckpt is not None else None)
        _choose_forwards(weights.model, cfg)
        return weights, model_dir
    writer.write_rest_and_index(src, tokenizer)
    from oats.weights import LazyModel

    return LazyModel.from_dir(model_dir, cfg.dtype), model_dir  # evaluate what was written


def update_model(cfg: Any, model: nn.Module, cal: Calibrated, device: torch.device, store: UpdateStore | None = None) -> None:
    """The selected model update on the whole compressed model (its record goes to ``cal.model_update``;
    a resumable one keeps its state between epochs in ``store``, the checkpoint's); without compress mode
    the factored layers are merged back into dense weights afterwards."""
    update = selected_plugins(cfg).get("model_update")
    if update is None:
        return
    from oats.model_update import merge_factored, run_model_update

    if cal.dense_targets is None:
        raise RuntimeError(f"model_update {update.name!r}: no dense targets were recorded before compression")
    cal.model_update = run_model_update(model, update, cal.dense_targets, cfg, device, store)
    cal.dense_targets = None
    if not cfg.get("compress"):
        merge_factored(model)


def compression_record(cal: Calibrated) -> dict[str, Any]:
    """The record's allocation and the sparsity achieved over every compressed matrix."""
    out: dict[str, Any] = {"block_sparsity": list(cal.allocation.sparsities)}
    if cal.allocation.info:  # what a layerwise plugin measured (OWL: LOD per block)
        out["layerwise"] = cal.allocation.info
    if cal.model_update is not None:
        out["model_update"] = cal.model_update
    total = sum(r["shape"][0] * r["shape"][1] for r in cal.layers)
    out["achieved_sparsity"] = 1.0 - sum(r["kept_params"] for r in cal.layers) / total
    return out


def keep_model(cfg: Any, weights: Any, tokenizer: Any, exp_dir: Path, compressed: bool) -> dict[str, Any]:
    """``save_model``: the model into ``<exp>/model`` (a lazy run's shards are already there; without
    ``save_model`` they go); ``export_format``: the saved model exported into ``<exp>/export``.
    Returns the record's export facts."""
    model_dir = exp_dir / MODEL_DIR
    if cfg.save_model and not weights.lazy:
        from factored.module import save_compressed  # save_pretrained + the manifest of compress-mode layers

        save_compressed(weights.model, model_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
        (model_dir / MODEL_MARKER).touch()
    elif weights.lazy and compressed and not cfg.save_model:
        from data.files import remove_tree

        remove_tree(model_dir, inside=exp_dir, marker=MODEL_MARKER)  # written by this run
    if not cfg.get("export_format"):
        return {}
    from export import export_from_dir

    report = export_from_dir(model_dir, exp_dir / EXPORT_DIR, cfg.export_format)
    total = report.get("total", {})
    log.info("exported %s as %s to %s: %s bytes of tensors, %.3fx the dense checkpoint in the same dtype", exp_dir.name,
             cfg.export_format, exp_dir / EXPORT_DIR, total.get("tensor_bytes"), total.get("ratio", float("nan")))
    return {"export": {"format": cfg.export_format, "dir": EXPORT_DIR, "total": total}}


def run_experiment(cfg: Any, exp_dir: Path) -> dict[str, Any]:
    """Load, calibrate, compress, evaluate, keep one experiment; returns its record (not yet written)."""
    from oats.tasks import task_for

    method = selected_plugins(cfg)["method"]
    exp_dir = Path(exp_dir)
    timings: dict[str, float] = {}
    t_all, device = start_experiment(cfg)

    t = time.perf_counter()
    tokenizer, weights, src = open_weights(cfg)
    timings["load"] = time.perf_counter() - t
    task = task_for(cfg, weights, tokenizer, device)
    record: dict[str, Any] = {"device": str(device), "seed": cfg.seed, "lazy_load": bool(cfg.lazy_load),
                              "compresses": method.compresses, "method_label": method_label(cfg)}
    layers: list[dict[str, Any]] = []
    model_dir = src
    if method.compresses:
        from oats.checkpoint import BlockCheckpointer

        t = time.perf_counter()
        ckpt = BlockCheckpointer(exp_dir, config_hash(cfg), save_blocks=not weights.lazy) if cfg.checkpoint_blocks else None
        cal = calibrate(cfg, task, weights, device, ckpt)
        if cal.start_block:
            record["resumed_after_block"] = cal.start_block
        timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        weights, model_dir = compress(cfg, weights, cal, ckpt, exp_dir, src, tokenizer, device)
        timings["compression"] = time.perf_counter() - t
        record.update(compression_record(cal))
        layers = cal.layers
        del cal
    else:
        record["achieved_sparsity"] = 0.0
    t = time.perf_counter()
    record.update(task.evaluate(weights, model_dir, compressed=method.compresses, exp_dir=exp_dir))  # + 'placement' with device_map
    timings["evaluation"] = time.perf_counter() - t
    if not weights.lazy and (chosen := _forward_summary(weights.model)) is not None:
        record["forward"] = chosen
    record.update(keep_model(cfg, weights, tokenizer, exp_dir, method.compresses))
    return finish_record(record, timings, t_all, device, layers)


def _choose_forwards(model: nn.Module, cfg: Any) -> None:
    """Compress mode: every SparseLowRankLinear computes with the forward the config names, or the
    fastest one measured for its device, dtype, shape, density and rows (``forward: auto``)."""
    from factored.module import compressed_layers

    if compressed_layers(model):
        from factored.forward import install_auto_forward

        fixed = cfg.get("forward", "auto")
        install_auto_forward(model, fixed=None if fixed == "auto" else fixed, keep_dense=bool(cfg.get("forward_dense_copy", False)))


def _forward_summary(model: nn.Module) -> dict[str, Any] | None:
    from factored.module import compressed_layers

    if not compressed_layers(model):
        return None
    from factored.forward import forward_record

    rec = forward_record(model)
    return {"summary": rec["summary"], "calls": rec["calls"]}


def method_label(cfg: Any) -> str:
    """'wanda', 'OWL + wanda', 'sparsegpt + OPTIMA', 'OATS (κ=0.3, 80 it, fast)' ... as tables name an experiment."""
    from eval.report import method_label as compose

    m = selected_plugins(cfg)["method"]
    return compose(cfg, base=m.label(cfg) if m.label is not None else m.name)

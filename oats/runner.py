"""Running experiments: one at a time, each recorded (ok or failed) atomically, reruns skip what is done."""
from __future__ import annotations

import logging
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from oats.config import config_hash
from oats.results import read_record, write_record, write_summary

log = logging.getLogger(__name__)


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


def status_of(cfg: Any, out_root: Path) -> str:
    """'done' (result with this config's hash), 'failed', 'stale' (another config's result), or 'pending'."""
    rec = read_record(Path(out_root) / cfg.name)
    if rec is None:
        return "pending"
    if rec.get("config_hash") != config_hash(cfg):
        return "stale"
    return "done" if rec.get("status") == "ok" else "failed"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_experiment(cfg: Any, out_root: Path) -> dict[str, Any]:
    """Load, calibrate, compress, evaluate one experiment; returns its record (not yet written)."""
    from data import calibration_windows
    from eval.evaluate import evaluate
    from oats.compressor import block_sparsities, compress_model
    from oats.models import load_model
    from oats.pipeline import capture_inputs

    if cfg.lazy_load:  # bigger-than-memory path: blocks read from the shards one at a time
        from oats.lazy import run_lazy

        return run_lazy(cfg, out_root)
    timings: dict[str, float] = {}
    t_all, device = start_experiment(cfg)

    t = time.perf_counter()
    model, tokenizer = load_model(cfg.model, cfg.dtype)
    timings["load"] = time.perf_counter() - t
    record: dict[str, Any] = {"device": str(device), "seed": cfg.seed}
    layers: list[dict[str, Any]] = []
    if cfg.method != "dense":
        t = time.perf_counter()
        from oats.checkpoint import BlockCheckpointer, set_rng_state

        ckpt = BlockCheckpointer(Path(out_root) / cfg.name, config_hash(cfg)) if cfg.checkpoint_blocks else None
        resumed = ckpt.load(device) if ckpt is not None else None
        if resumed is not None:  # a killed run's checkpoint: finished blocks back in, continue after them
            ckpt.restore_blocks(model, resumed.last_block)
            set_rng_state(resumed.rng)
            inputs, layers, sparsities, layerwise_info = resumed.inputs, resumed.records, resumed.sparsities, resumed.layerwise_info
            start_block = record["resumed_after_block"] = resumed.last_block + 1
        else:
            ids = calibration_windows(tokenizer, cfg.cal_dataset, cfg.cal_nsamples, cfg.cal_seqlen, cfg.cal_sampler, cfg.seed, cfg.data_dir)
            inputs = capture_inputs(model, ids, device, cfg.cal_batch_size)
            sparsities = block_sparsities(model, inputs, cfg, device)
            layerwise_info, start_block = getattr(sparsities, "info", None), 0
        timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        after = ckpt.after_block_fn(layers, sparsities, layerwise_info) if ckpt is not None else None
        layers = compress_model(model, inputs, cfg, device, sparsities, start_block=start_block, after_block=after, records=layers)
        timings["compression"] = time.perf_counter() - t
        del inputs
        record["block_sparsity"] = list(sparsities)
        if layerwise_info:  # what a layerwise allocator measured (OWL: LOD per block)
            record["layerwise"] = layerwise_info
        total = sum(r["shape"][0] * r["shape"][1] for r in layers)
        record["achieved_sparsity"] = 1.0 - sum(r["kept_params"] for r in layers) / total
    else:
        record["achieved_sparsity"] = 0.0
    t = time.perf_counter()
    model.to(device)
    record["metrics"] = evaluate(model, tokenizer, cfg, device)
    timings["evaluation"] = time.perf_counter() - t
    if cfg.save_model:
        from oats.compressed import save_compressed  # save_pretrained + the manifest of compress-mode layers

        save_compressed(model, Path(out_root) / cfg.name / "model")
        tokenizer.save_pretrained(Path(out_root) / cfg.name / "model")
    return finish_record(record, timings, t_all, device, layers)


def start_experiment(cfg: Any) -> tuple[float, torch.device]:
    """(start time, compute device) of an experiment: peak-memory counters reset, torch seeded."""
    from oats.models import resolve_device

    t_all = time.perf_counter()
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


def run_all(cfgs: Sequence[Any], out_root: Path, force: bool = False) -> dict[str, str]:
    """Run every experiment not already done; a failure is recorded with its traceback and the run goes on."""
    out_root = Path(out_root)
    outcome: dict[str, str] = {}
    for i, cfg in enumerate(cfgs):
        h = config_hash(cfg)
        if not force and status_of(cfg, out_root) == "done":
            log.info("[%d/%d] %s: done already (config hash %s), skipped", i + 1, len(cfgs), cfg.name, h)
            outcome[cfg.name] = "skipped"
            continue
        log.info("[%d/%d] %s: running (%s, sparsity %s, %s)", i + 1, len(cfgs), cfg.name, cfg.method, cfg.sparsity, cfg.sparsity_type)
        base = {"name": cfg.name, "config": cfg.to_dict(), "config_hash": h, "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            record = {**base, "status": "ok", **run_experiment(cfg, out_root)}
            outcome[cfg.name] = "ok"
        except Exception as e:
            log.error("%s failed: %s: %s", cfg.name, type(e).__name__, e)
            record = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            outcome[cfg.name] = "failed"
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_record(out_root / cfg.name, record)
        if outcome[cfg.name] == "ok":  # the result is safe on disk: the block checkpoints have served
            from oats.checkpoint import BlockCheckpointer

            BlockCheckpointer(out_root / cfg.name, h).clear()
        write_summary(out_root)
    return outcome

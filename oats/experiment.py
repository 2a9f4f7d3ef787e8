"""One experiment's lifecycle, whatever holds the weights: load, resume or calibrate, allocate,
compress block by block (checkpointing), evaluate, record.

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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from oats.config import config_hash, selected_plugins
from oats.pipeline import BlockInputs, capture_inputs, stream, streamed_outputs

log = logging.getLogger(__name__)

MODEL_DIR = "model"
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
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def block_sparsities(weights: Any, inputs: BlockInputs, cfg: Any, device: torch.device) -> list[float]:
    """Per-block target sparsity: uniform, or from the selected layerwise allocator, which streams the
    dense model (loaded block by block when the weights are lazy)."""
    from oats.architectures import get_blocks

    n = len(get_blocks(weights.model))
    allocator = selected_plugins(cfg).get("allocator")
    if allocator is None:
        return [float(cfg.sparsity)] * n
    stats_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32

    def stream_dense(kind: str, on_block: Callable[..., None], desc: str) -> None:
        stream(weights.model, inputs, device, kind, on_block, stats_dtype, desc=desc,
               before_block=weights.load_block, after_block=lambda i, *a: weights.free_block(i))

    return allocator.allocate(stream_dense, n, cfg)


def streamed_perplexity(weights: Any, tokens: Tensor, seqlen: int, max_windows: int | None, device: torch.device,
                        batch_size: int = 1) -> float:
    """Token perplexity (the protocol of ``eval.perplexity``) computed one block at a time, each block's
    weights loaded just before and freed just after it runs (never the whole model in memory)."""
    from eval.perplexity import perplexity_of, windows_of

    windows = windows_of(tokens, seqlen, max_windows)
    return perplexity_of(streamed_outputs(weights.model, windows, device, batch_size, before_block=weights.load_block,
                                          after_block=lambda i, *a: weights.free_block(i), load_head=weights.load_head,
                                          free_head=weights.free_head, desc="streamed perplexity"))


def _token_perplexity(weights: Any, cfg: Any, device: torch.device) -> Callable[[Tensor], float]:
    from eval.perplexity import perplexity

    if not weights.lazy:
        return lambda tokens: perplexity(weights.model, tokens, cfg.eval_seqlen, cfg.eval_max_windows, cfg.eval_batch_size, device)
    return lambda tokens: streamed_perplexity(weights, tokens, cfg.eval_seqlen, cfg.eval_max_windows, device, cfg.eval_batch_size)


def _whole_model(weights: Any, model_dir: Path | None, device: torch.device) -> Callable[[], nn.Module]:
    """The model lm_eval needs whole: in memory, the model itself; lazy, the (compressed) model loaded
    from its shards, once (memory: the whole model, as lm_eval runs it)."""
    cache: list[nn.Module] = []

    def get() -> nn.Module:
        if not cache:
            if weights.lazy:
                from oats.algorithm.compressed import load_compressed

                log.warning("lazy_load: lm_eval needs the whole model; loading it from %s (memory: the whole model)", model_dir)
                cache.append(load_compressed(model_dir, dtype=weights.dtype).to(device))
            else:
                cache.append(weights.model.to(device))
        return cache[0]

    return get


def run_experiment(cfg: Any, exp_dir: Path) -> dict[str, Any]:
    """Load, calibrate, compress, evaluate one experiment; returns its record (not yet written)."""
    from data import calibration_windows, eval_tokens
    from eval.evaluate import evaluate
    from oats.compressor import compress_model

    plugins = selected_plugins(cfg)
    method = plugins["method"]
    exp_dir = Path(exp_dir)
    timings: dict[str, float] = {}
    t_all, device = start_experiment(cfg)

    t = time.perf_counter()
    tokenizer, weights, src = open_weights(cfg)
    timings["load"] = time.perf_counter() - t
    vision = _vision_task(cfg, weights, device)  # None for language models: the text path below is unchanged
    record: dict[str, Any] = {"device": str(device), "seed": cfg.seed, "lazy_load": bool(cfg.lazy_load),
                              "compresses": method.compresses, "method_label": method_label(cfg)}
    layers: list[dict[str, Any]] = []
    model_dir = src
    if method.compresses:
        from oats.checkpoint import BlockCheckpointer, set_rng_state

        t = time.perf_counter()
        ckpt = BlockCheckpointer(exp_dir, config_hash(cfg), save_blocks=not weights.lazy) if cfg.checkpoint_blocks else None
        resumed = ckpt.load(device) if ckpt is not None else None
        if resumed is not None:  # a killed run's checkpoint: finished blocks back in, continue after them
            if not weights.lazy:  # lazy: the finished blocks are already in their output shards
                ckpt.restore_blocks(weights.model, resumed.last_block)
            set_rng_state(resumed.rng)
            inputs, layers, sparsities, layerwise_info = resumed.inputs, resumed.records, resumed.sparsities, resumed.layerwise_info
            start_block = record["resumed_after_block"] = resumed.last_block + 1
        else:
            if vision is not None:
                ids = vision.calibration_inputs()  # pixel_values [n, 3, H, W]
                vision.prepare_reference()  # dense features for fidelity, before anything is compressed
            else:
                ids = calibration_windows(tokenizer, cfg.cal_dataset, cfg.cal_nsamples, cfg.cal_seqlen, cfg.cal_sampler, cfg.seed, cfg.data_dir)
            weights.load_head()
            inputs = capture_inputs(weights.model, ids, device, cfg.cal_batch_size)
            weights.free_head()
            sparsities = block_sparsities(weights, inputs, cfg, device)
            layerwise_info, start_block = getattr(sparsities, "info", None), 0
        timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        writer = None
        if weights.lazy:
            from oats.weights import ShardWriter

            model_dir = exp_dir / MODEL_DIR
            writer = ShardWriter(model_dir, weights)
            (model_dir / MODEL_MARKER).touch()
        save = ckpt.after_block_fn(layers, sparsities, layerwise_info) if ckpt is not None else None

        def after_block(i: int, block: nn.Module, next_inputs: BlockInputs) -> None:
            if writer is not None:
                writer.write_block(i, block)  # the shard first: a checkpoint must never point past it
            if save is not None:
                save(i, block, next_inputs)
            weights.free_block(i)

        layers = compress_model(weights.model, inputs, cfg, device, sparsities, start_block=start_block,
                                after_block=after_block, records=layers, before_block=weights.load_block)
        del inputs
        if writer is not None:
            writer.write_rest_and_index(src, tokenizer)
            from oats.weights import LazyModel

            weights = LazyModel.from_dir(model_dir, cfg.dtype)  # evaluate what was written
        timings["compression"] = time.perf_counter() - t
        record["block_sparsity"] = list(sparsities)
        if layerwise_info:  # what a layerwise allocator measured (OWL: LOD per block)
            record["layerwise"] = layerwise_info
        total = sum(r["shape"][0] * r["shape"][1] for r in layers)
        record["achieved_sparsity"] = 1.0 - sum(r["kept_params"] for r in layers) / total
        if not weights.lazy:
            _choose_forwards(weights.model, cfg)
    else:
        record["achieved_sparsity"] = 0.0
    t = time.perf_counter()
    if vision is not None:
        record["metrics"] = vision.metrics(compressed=method.compresses)
    else:
        record["data"] = data_fingerprints(cfg)
        record["eval_tokens"] = {}

        def tokens_of(name: str) -> Tensor:
            from eval.perplexity import n_windows

            tokens = eval_tokens(tokenizer, name, cfg.data_dir)
            record["eval_tokens"][name] = n_windows(tokens.shape[1], cfg.eval_seqlen, cfg.eval_max_windows) * cfg.eval_seqlen
            return tokens

        record["metrics"] = evaluate(cfg, tokens_of, tokenizer, _token_perplexity(weights, cfg, device), _whole_model(weights, model_dir, device))
    timings["evaluation"] = time.perf_counter() - t
    if not weights.lazy and (chosen := _forward_summary(weights.model)) is not None:
        record["forward"] = chosen
    if cfg.save_model and not weights.lazy:
        from oats.algorithm.compressed import save_compressed  # save_pretrained + the manifest of compress-mode layers

        save_compressed(weights.model, exp_dir / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(exp_dir / MODEL_DIR)
        (exp_dir / MODEL_DIR / MODEL_MARKER).touch()
    elif weights.lazy and method.compresses and not cfg.save_model:
        from data.files import remove_tree

        remove_tree(exp_dir / MODEL_DIR, inside=exp_dir, marker=MODEL_MARKER)  # written by this run
    return finish_record(record, timings, t_all, device, layers)


def _choose_forwards(model: nn.Module, cfg: Any) -> None:
    """Compress mode: every SparseLowRankLinear computes with the forward the config names, or the
    fastest one measured for its device, dtype, shape, density and rows (``forward: auto``)."""
    from oats.algorithm.compressed import compressed_layers

    if compressed_layers(model):
        from oats.algorithm.forward import install_auto_forward

        fixed = cfg.get("forward", "auto")
        install_auto_forward(model, fixed=None if fixed == "auto" else fixed)


def _forward_summary(model: nn.Module) -> dict[str, Any] | None:
    from oats.algorithm.compressed import compressed_layers

    if not compressed_layers(model):
        return None
    from oats.algorithm.forward import forward_record

    rec = forward_record(model)
    return {"summary": rec["summary"], "calls": rec["calls"]}


def data_fingerprints(cfg: Any) -> dict[str, Any]:
    """Size and hash of every corpus split the experiment reads ('cal:pydoc', 'eval:wikitext2'...)."""
    from data import corpus_fingerprint

    out = {}
    if selected_plugins(cfg)["method"].compresses:
        out[f"cal:{cfg.cal_dataset}"] = corpus_fingerprint(cfg.cal_dataset, "train", cfg.data_dir)
    for d in cfg.eval_datasets:
        out[f"eval:{d}"] = corpus_fingerprint(d, "test", cfg.data_dir)
    return out


def _vision_task(cfg: Any, weights: Any, device: torch.device):
    """The vision side of the experiment when the model's adapter says ``modality == 'vision'``, else None;
    the config's data must match the model's modality."""
    from oats.architectures import architecture_of
    from oats.config import is_vision_config

    vision_model = architecture_of(weights.model).modality == "vision"
    if vision_model != is_vision_config(cfg):
        what = "an image transformer" if vision_model else "a language model"
        want = "an image data set (photos, fashion_mnist, imagefolder)" if vision_model else "a text corpus"
        raise ValueError(f"config key 'cal_dataset': {cfg.cal_dataset!r}, but model {cfg.model!r} is {what}; use {want}")
    if not vision_model:
        return None
    if cfg.checkpoint_blocks:
        raise ValueError("config key 'checkpoint_blocks': not supported for vision models (a resumed run has no dense reference features); set it False")
    from oats.vision_task import VisionTask

    return VisionTask(cfg, weights.model, device)


def method_label(cfg: Any) -> str:
    """'wanda', 'OWL + wanda', 'sparsegpt + OPTIMA', 'OATS (κ=0.3, 80 it, fast)' ... as tables name an experiment."""
    plugins = selected_plugins(cfg)
    m = plugins["method"]
    label = m.label(cfg) if m.label is not None else m.name
    if "allocator" in plugins:
        label = f"{plugins['allocator'].name.upper()} + {label}"
    for kind in ("update", "block_update"):
        if kind in plugins:
            label = f"{label} + {plugins[kind].name.upper()}"
    return label

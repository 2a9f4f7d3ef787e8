"""Memory plans of models bigger than one device (shapes from ``configs/shapes/*/config.json``; nothing
to download, nothing loads): the papers' protocol, 128 calibration windows of 2048 tokens, bfloat16.

    python main.py --config configs/big_models_plan.py --plan --gpu-memory 80GiB

The last two rows are Llama-3-70B SparseGPT under ``lazy_load`` with its activations and Gram matrices on
the CPU (``stats_device``), and the same evaluated across a node's four 80 GiB GPUs (``device_map``).
"""
from functools import partial
from pathlib import Path

from configs import base

SHAPES = Path(__file__).resolve().parent / "shapes"
PAPERS = dict(cal_dataset="c4", eval_datasets=["wikitext2"], cal_nsamples=128, cal_seqlen=2048, cal_batch_size=8,
              eval_seqlen=2048, eval_max_windows=None, dtype="bfloat16", device="cuda", sparsity=0.5)
experiment = partial(base.experiment, PAPERS)

CONFIGS = [
    experiment(name=f"{model}-{method}{'-lazy' if lazy else ''}", model=str(SHAPES / model), method=method, lazy_load=lazy)
    for model in ("llama-3-8b", "llama-3-70b", "phi-3-medium")
    for method, lazy in (("dense", False), ("wanda", False), ("sparsegpt", False), ("oats", False), ("sparsegpt", True))
] + [
    experiment(name="llama-3-70b-sparsegpt-lazy-stats-cpu", model=str(SHAPES / "llama-3-70b"), method="sparsegpt",
               lazy_load=True, stats_device="cpu", eval_max_windows=64),
    experiment(name="llama-3-70b-sparsegpt-4gpus", model=str(SHAPES / "llama-3-70b"), method="sparsegpt",
               lazy_load=True, stats_device="cpu", eval_max_windows=64, device_map="balanced",
               max_memory={**{f"cuda:{i}": "70GiB" for i in range(4)}, "cpu": "200GiB"}),
]

"""The README's table: every method on the embedded SmolLM2-135M, WikiText-2 token perplexity.

Protocol (``configs.base.WIKITEXT``): float32 on the CPU; calibration on the C4 stand-in of
../shared/data (its 200-document train part), Wanda/SparseGPT random windows, 32 windows x 512 tokens,
seed 0; evaluation on WikiText-2 test (raw, rows joined by "\\n\\n"), windows of 512 tokens, the first 64
windows (32,768 tokens).

    python main.py --config configs/smollm2_wikitext.py --out results/smollm2_wikitext
"""
from functools import partial

from configs import base
from configs.base import ZERO_SHOT

BASE = {**base.WIKITEXT, "seed": 0, "device": "cpu"}
experiment = partial(base.experiment, BASE)

CONFIGS = [
    experiment(name="dense", method="dense"),
    experiment(name="magnitude-50", method="magnitude", sparsity=0.5),
    experiment(name="wanda-50", method="wanda", sparsity=0.5),
    experiment(name="sparsegpt-50", method="sparsegpt", sparsity=0.5),
    experiment(name="oats-50", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=80),
    experiment(name="wanda-70", method="wanda", sparsity=0.7),
    experiment(name="sparsegpt-70", method="sparsegpt", sparsity=0.7),
    experiment(name="owl-wanda-50", method="wanda", sparsity=0.5, layerwise="owl"),
    experiment(name="owl-sparsegpt-50", method="sparsegpt", sparsity=0.5, layerwise="owl"),
    experiment(name="owl-wanda-70", method="wanda", sparsity=0.7, layerwise="owl"),
    experiment(name="owl-sparsegpt-70", method="sparsegpt", sparsity=0.7, layerwise="owl"),
    experiment(name="wanda-50-optima", method="wanda", sparsity=0.5, weight_update="optima"),
    experiment(name="sparsegpt-50-optima", method="sparsegpt", sparsity=0.5, weight_update="optima"),
    # zero-shot (lm_eval, local task files, first 100 examples of each task on this CPU)
    experiment(name="dense-zs", method="dense", eval_datasets=[], zero_shot_tasks=ZERO_SHOT, zero_shot_limit=100, zero_shot_batch_size=16),
    experiment(name="wanda-50-zs", method="wanda", sparsity=0.5, eval_datasets=[], zero_shot_tasks=ZERO_SHOT, zero_shot_limit=100, zero_shot_batch_size=16),
    experiment(name="oats-50-zs", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=80, eval_datasets=[], zero_shot_tasks=ZERO_SHOT, zero_shot_limit=100, zero_shot_batch_size=16),
    # fast vs exact low-rank step at 20 iterations (the end-to-end check of the fast path)
    experiment(name="oats-50-it20", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=20, svd="fast"),
    experiment(name="oats-50-it20-exact", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=20, svd="exact"),
    # the same check at the paper's 80 iterations (exact: full thin SVD every iteration)
    experiment(name="oats-50-exact", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=80, svd="exact"),
    experiment(name="oats-50-tol3e-3", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=80, svd_tol=3e-3),
    experiment(name="oats-50-tol1e-4", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=80, svd_tol=1e-4),
]

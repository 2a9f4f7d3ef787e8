"""Every method at 50% and 70% on the embedded SmolLM2-135M and the pydoc corpus (13 experiments):
16 calibration windows of 512 tokens, perplexity on the first 16 windows of 512 tokens. About 45
minutes on a 2-core CPU.

    python main.py --config configs/smollm2_pydoc_sweep.py
"""
from functools import partial

from configs import base

# CPU-sized (the papers use 128 x 2048 calibration tokens).
BASE = {**base.PYDOC, "cal_nsamples": 16, "cal_seqlen": 512, "eval_seqlen": 512, "eval_max_windows": 16}
experiment = partial(base.experiment, BASE)

CONFIGS = [
    experiment(name="dense", method="dense"),
    experiment(name="magnitude-50", method="magnitude", sparsity=0.5),
    # OATS at compression rate 0.5, rank ratio 0.3; 20 iterations instead of the paper's 80 to fit a CPU.
    experiment(name="oats-50", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=20),
    experiment(name="wanda-50", method="wanda", sparsity=0.5),
    experiment(name="wanda-70", method="wanda", sparsity=0.7),
    experiment(name="sparsegpt-50", method="sparsegpt", sparsity=0.5),
    experiment(name="sparsegpt-70", method="sparsegpt", sparsity=0.7),
    experiment(name="owl-wanda-50", method="wanda", sparsity=0.5, layerwise="owl"),
    experiment(name="owl-wanda-70", method="wanda", sparsity=0.7, layerwise="owl"),
    experiment(name="owl-sparsegpt-50", method="sparsegpt", sparsity=0.5, layerwise="owl"),
    experiment(name="owl-sparsegpt-70", method="sparsegpt", sparsity=0.7, layerwise="owl"),
    experiment(name="wanda-50-optima", method="wanda", sparsity=0.5, weight_update="optima"),
    experiment(name="sparsegpt-50-optima", method="sparsegpt", sparsity=0.5, weight_update="optima"),
]

# Defaults for `python main.py --slurm` (the command line overrides them):
# SLURM = dict(partition="gpu", gpus=1, time=240, mem=64, cpus=8, array_parallelism=16)

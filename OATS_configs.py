"""The experiment list `python main.py` runs: the first run, sized to finish in about 3 minutes on a
2-core CPU from a fresh clone (model conversion included), offline, on the embedded SmolLM2-135M and
CPython's pydoc corpus. It shows the project: the dense reference, Wanda, SparseGPT and OATS, all at
50%. (Wanda + OPTIMA, the best 50% row of the README's WikiText-2 table, took 2 minutes on its own in
the timed first run, so it is left to the other lists: `weight_update="optima"` adds it.)

Each entry is an ml_collections.ConfigDict holding any subset of the keys in the README's "Config keys"
table; the rest take their defaults. Other lists live in configs/ (the README's tables:
configs/smollm2_wikitext.py; every method at 50% and 70%: configs/smollm2_pydoc_sweep.py; the quality
benchmark over three seeds: configs/smollm2_quality.py), and the protocols they share in configs/base.py.
"""
from functools import partial

from configs import base

# The papers calibrate on 128 x 2048 tokens; 8 x 256 keeps the first run short (numbers are then noisier
# than the README's tables, which use 32 x 512 and 64 eval windows).
BASE = {**base.PYDOC, "cal_nsamples": 8, "cal_seqlen": 256, "cal_batch_size": 8, "eval_seqlen": 256, "eval_max_windows": 8,
        "eval_batch_size": 4}
experiment = partial(base.experiment, BASE)

CONFIGS = [
    experiment(name="dense", method="dense"),
    experiment(name="wanda-50", method="wanda", sparsity=0.5),
    experiment(name="sparsegpt-50", method="sparsegpt", sparsity=0.5),
    # OATS at compression rate 0.5 (sparse nonzeros + low-rank entries), rank ratio 0.3; 40 of the paper's 80 iterations
    experiment(name="oats-50", method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=40),
]

# Defaults for `python main.py --slurm` (the command line overrides them):
# SLURM = dict(partition="gpu", gpus=1, time=240, mem=64, cpus=8, array_parallelism=16)

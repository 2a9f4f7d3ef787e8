"""The memory plan checked against measured peaks: SmolLM2-135M on pydoc, each method once, in memory
and lazily loaded, and one longer-window SparseGPT run (its evaluation's logits dominate).

    python main.py --config configs/smollm2_memory.py --plan                          # the predictions
    OMP_NUM_THREADS=1 python main.py --config configs/smollm2_memory.py --out results/memory   # the measured peaks
"""
from functools import partial

from configs import base

BASE = {**base.PYDOC, "device": "cpu", "cal_nsamples": 16, "cal_seqlen": 256, "cal_batch_size": 8, "eval_seqlen": 256,
        "eval_max_windows": 4}
experiment = partial(base.experiment, BASE)

CONFIGS = [
    experiment(name="dense", method="dense"),
    experiment(name="wanda", method="wanda", sparsity=0.5),
    experiment(name="sparsegpt", method="sparsegpt", sparsity=0.5),
    experiment(name="oats", method="oats", sparsity=0.5, num_iters=5),
    experiment(name="wanda-lazy", method="wanda", sparsity=0.5, lazy_load=True),
    experiment(name="sparsegpt-1k", method="sparsegpt", sparsity=0.5, cal_nsamples=32, cal_seqlen=1024, cal_batch_size=4,
               eval_seqlen=1024, eval_batch_size=2),
]

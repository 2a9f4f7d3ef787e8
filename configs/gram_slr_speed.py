"""gram_slr against OATS at their default iterations, end to end, on a small protocol (2 experiments).

    OMP_NUM_THREADS=1 python main.py --config configs/gram_slr_speed.py --out results/gram_slr_speed

SmolLM2-135M, float32; calibration: the default list's (pydoc, 8 windows x 256 tokens, seed 0); token
perplexity on pydoc and on WikiText-2 test (from ``data_dir``), ``eval_seqlen`` 256, the first 64 windows
of each (16,384 tokens). Compression rate 0.5, rank_ratio 0.3 (the OATS budget, shared). OATS at its
defaults (80 iterations, fast low-rank step); gram_slr at its defaults (20 iterations, sparse step
'optima', solver 'fast'). Measured: docs/results.md, "gram_slr against OATS, end to end".
"""
from functools import partial

from configs import base

BASE = {**base.PYDOC, "cal_nsamples": 8, "cal_seqlen": 256, "cal_batch_size": 8, "eval_seqlen": 256, "eval_max_windows": 64,
        "eval_batch_size": 4, "eval_datasets": ["pydoc", "wikitext2"], "data_dir": base.DATA}
experiment = partial(base.experiment, BASE)

CONFIGS = [
    experiment(name="oats-50", method="oats", sparsity=0.5, rank_ratio=0.3),
    experiment(name="gram_slr-50", method="gram_slr", sparsity=0.5, rank_ratio=0.3),
]

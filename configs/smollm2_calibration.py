"""How much of the SparseGPT-to-dense gap is data: SparseGPT 50% on SmolLM2 calibrated on more tokens and
on text the dense model wrote itself, three calibration seeds each.

    python main.py --config configs/smollm2_calibration.py --out results/calibration
    OATS_BENCH_ROWS='sparsegpt-50-sg-16k-*' python main.py --config configs/smollm2_calibration.py --out results/calibration
    python -m tools.report_quality results/calibration

Protocol: the README's (``configs.base.WIKITEXT``: WikiText-2 test, eval_seqlen 512, the first 64
windows), windows of 512 tokens. Rows ``sparsegpt-50-<source>-<tokens>-s<seed>``:

* source ``c4``: random windows of the C4 stand-in (its 200 training documents; windows overlap as the
  count grows), ``sg``: ``cal_dataset: self_generated`` (sampled from the dense SmolLM2, temperature 1,
  top-p 1, seeded), ``mix``: half of each (``cal_mix: [0.5, 0.5]``);
* tokens ``16k`` (32 windows, the README's), ``64k`` (128), ``256k`` (512).

The 16k ``c4`` rows are the quality table's ``sparsegpt-50`` rows (same config hash).
$OATS_BENCH_ROWS: comma-separated shell patterns on the names.
"""
import fnmatch
import os

from configs import base

SEEDS = (1, 2, 3)
TOKENS = {"16k": 32, "64k": 128, "256k": 512}
SOURCES = {"c4": dict(cal_dataset="c4"), "sg": dict(cal_dataset="self_generated"),
           "mix": dict(cal_dataset=["c4", "self_generated"], cal_mix=[0.5, 0.5])}
BASE = {**base.WIKITEXT, "device": os.environ.get("OATS_BENCH_DEVICE", "auto"), "method": "sparsegpt", "sparsity": 0.5}


def build() -> list:
    cfgs = [base.experiment(BASE, name=f"sparsegpt-50-s{seed}" if (src, tok) == ("c4", "16k") else f"sparsegpt-50-{src}-{tok}-s{seed}",
                            cal_nsamples=n, seed=seed, **over)
            for src, over in SOURCES.items() for tok, n in TOKENS.items() for seed in SEEDS]
    patterns = [p for p in os.environ.get("OATS_BENCH_ROWS", "").split(",") if p]
    if patterns:
        cfgs = [c for c in cfgs if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return cfgs


CONFIGS = build()

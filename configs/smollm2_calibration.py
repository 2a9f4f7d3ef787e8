"""How much of the SparseGPT-to-dense gap is data: SparseGPT 50% and the best reconstruction (OATS 50% at
κ = 0.3 with low-rank recovery) on SmolLM2, calibrated on more tokens and on text the dense model wrote
itself, three calibration seeds each.

    python main.py --config configs/smollm2_calibration.py --out results/calibration
    OATS_BENCH_ROWS='sparsegpt-50-sg-16k-*' python main.py --config configs/smollm2_calibration.py --out results/calibration
    python -m tools.report_quality results/calibration

Protocol: the README's (``configs.base.WIKITEXT``: WikiText-2 test, eval_seqlen 512, the first 64
windows), windows of 512 tokens. Rows ``sparsegpt-50-<source>-<tokens>-s<seed>``:

* source ``c4``: random windows of the C4 stand-in (its 200 training documents; windows overlap as the
  count grows), ``sg``: ``cal_dataset: self_generated`` (sampled from the dense SmolLM2, temperature 1,
  top-p 1, seeded), ``mix``: half of each (``cal_mix: [0.5, 0.5]``);
* tokens ``16k`` (32 windows, the README's), ``64k`` (128), ``256k`` (512).

Rows ``oats-50-k0.3-recovery-<source>-16k-s<seed>`` and ``oats-50-k0.3-recovery-<source>-<64k|256k>-e<epochs>-s<seed>``:
OATS 50%, κ = 0.3, then ``model_update: lowrank_recovery`` (the low-rank factors distilled against the
dense model's logits on the same calibration windows), 3 epochs at 16k (the key's default), 4 above; 256k
also at 1 epoch (``-256k-e1``), the same number of optimiser steps as 64k at 4 epochs, so that row measures
more distinct text at equal training compute.

Rows ``oats-50-k0.3-recovery-<stats>-<text>distill-<16k|64k-e4>-s<seed>`` split the two uses of the text:
the compression's statistics on the tokens of one source, the recovery's distillation (``update_dataset``)
on as many tokens of the other (``sg-c4distill``: the model's own text for the statistics, C4 for the
distillation; ``c4-sgdistill`` the other way round), epochs as above.

The ``c4`` rows at 16k are the quality table's ``sparsegpt-50`` and ``oats-50-k0.3-recovery`` rows, and at
64k its ``oats-50-k0.3-recovery-64k-e4`` rows (same names and config hashes).
$OATS_BENCH_ROWS: comma-separated shell patterns on the names.
"""
import fnmatch
import os

from configs import base

SEEDS = (1, 2, 3)
TOKENS = {"16k": 32, "64k": 128, "256k": 512}
RECOVERY_EPOCHS = {"16k": (3,), "64k": (4,), "256k": (4, 1)}  # 3: the key's default, so its rows carry no -e suffix
SOURCES = {"c4": dict(cal_dataset="c4"), "sg": dict(cal_dataset="self_generated"),
           "mix": dict(cal_dataset=["c4", "self_generated"], cal_mix=[0.5, 0.5])}
BASE = {**base.WIKITEXT, "device": os.environ.get("OATS_BENCH_DEVICE", "auto"), "sparsity": 0.5,
        "sparsity_type": "unstructured"}
RECOVERY = dict(method="oats", rank_ratio=0.3, model_update="lowrank_recovery")
# the quality table's names for its C4 rows
QUALITY_NAMES = {("sparsegpt", "16k"): "sparsegpt-50", ("recovery", "16k"): "oats-50-k0.3-recovery",
                 ("recovery", "64k"): "oats-50-k0.3-recovery-64k-e4"}


def _rows(method: str, src: str, tok: str, seed: int) -> list[tuple[str, dict]]:
    if method == "sparsegpt":
        rows = [(f"sparsegpt-50-{src}-{tok}", dict(method="sparsegpt"))]
    else:
        rows = [(f"oats-50-k0.3-recovery-{src}-{tok}", RECOVERY) if epochs == 3 else
                (f"oats-50-k0.3-recovery-{src}-{tok}-e{epochs}", {**RECOVERY, "recovery_epochs": epochs})
                for epochs in RECOVERY_EPOCHS[tok]]
    if src == "c4" and (method, tok) in QUALITY_NAMES:  # sizes with one row each
        rows = [(QUALITY_NAMES[method, tok], rows[0][1])]
    return [(f"{name}-s{seed}", over) for name, over in rows]


def build() -> list:
    cfgs = []
    for method in ("sparsegpt", "recovery"):
        for src, source in SOURCES.items():
            for tok, n in TOKENS.items():
                for seed in SEEDS:
                    for name, over in _rows(method, src, tok, seed):
                        cfgs.append(base.experiment(BASE, name=name, cal_nsamples=n, seed=seed, **source, **over))
    for stats, text in (("sg", "c4"), ("c4", "sg")):
        for tok in ("16k", "64k"):
            for seed in SEEDS:
                for name, over in _rows("recovery", f"{stats}-{text}distill", tok, seed):
                    cfgs.append(base.experiment(BASE, name=name, cal_nsamples=TOKENS[tok], seed=seed, **SOURCES[stats],
                                                update_dataset=SOURCES[text]["cal_dataset"], **over))
    patterns = [p for p in os.environ.get("OATS_BENCH_ROWS", "").split(",") if p]
    if patterns:
        cfgs = [c for c in cfgs if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return cfgs


CONFIGS = build()

"""The quality benchmark: every method at the same budget, three calibration seeds.

A config file, not a script that computes anything: it defines ``CONFIGS`` (ml_collections
ConfigDicts) for

    python main.py --config configs/smollm2_quality.py --out results/quality
    OATS_BENCH_ROWS='oats-50-*,gram_slr-50-*' python main.py --config configs/smollm2_quality.py --out results/quality

then ``eval.aggregate.group_by_seed`` turns the three ``-s<seed>`` records of a row into mean ± std
(``python -m tools.report_quality results/quality``).

Protocol (the README's, ``configs.base.WIKITEXT``): SmolLM2-135M; calibration on C4 from ``data_dir``
(../shared/data, or $OATS_DATA_DIR), ``cal_sampler random_windows``, 32 windows x 512 tokens, calibration
seeds 1, 2, 3; evaluation on WikiText-2 test, eval_seqlen 512, the first 64 windows. Compression 50% and
70% unstructured and 2:4 (sparsity 0.5). Rows (names ``<method>-<compression>[-k<rank_ratio>]-s<seed>``,
compression '50', '70' or '24'):

* ``dense`` (once: no calibration);
* ``wanda``, ``sparsegpt``, ``sparsegpt-optima`` (weight_update 'optima'), ``owl-sparsegpt``
  (layerwise 'owl'; unstructured only, OWL sets per-block sparsities that N:M fixes);
* ``oats`` at rank_ratio 0, 0.1, 0.2, 0.3; ``oats-optima`` at 0.3; ``oats-k0.3-recovery`` (model_update
  'lowrank_recovery': the low-rank factors distilled against the dense model's logits after compression),
  ``oats-k0.3-recovery-e8`` (the same, 8 epochs instead of 3) and ``oats-k0.3-recovery-64k`` (the same,
  calibrated and recovered on 128 windows, 64k tokens, instead of 32) and ``oats-k0.3-recovery-64k-e4`` (64k
  tokens, 4 epochs);
* ``<row>-distill`` (model_update 'masked_distill': every kept weight, sparse values on their fixed masks and
  low-rank factors, distilled the same way): ``sparsegpt-distill`` at every setting (and its variants
  ``sparsegpt-<compression>-distill-lr3e-4``, ``-bs1`` and ``-lr3e-4-bs1``: learning rate 3e-4 instead of
  1e-4, one window an Adam step instead of 4, both), ``oats-k0.3-distill``
  (unstructured) and ``oats-distill`` (2:4, rank 0), the end-to-end step for pure-sparse rows too;
  ``sparsegpt-<compression>-distill-64k-e4`` (the same on 128 windows, 64k tokens, 4 epochs), its ``-bs1``
  variant (one window an Adam step instead of 4: four times the steps for the same compute), that one's
  ``-p3`` variant (recovery_patience 3: all 4 epochs run whatever the held-out loss does, the best
  restored) and, unstructured
  only, ``owl-sparsegpt-<compression>-distill-64k-e4-lr3e-4-bs1`` (OWL's layerwise sparsities, learning rate
  3e-4, one window a step);
* ``gram_slr`` (full-Gram sparse + low-rank, sparse step 'optima') at rank_ratio 0, 0.1, 0.2, 0.3, and
  ``gram_slr-k0.3-d0.1`` (percdamp 0.1 instead of 0.01; unstructured only);
* ``<row>-recon``: block_update 'reconstruct' on the rows named in $OATS_BENCH_RECON (comma-separated
  row names without compression and seed, default the three expected best:
  ``sparsegpt-optima,oats-optima-k0.3,gram_slr-k0.3``; pick the measured best three after a first pass);
* ``<row>-recon-dm``: the same with ``recon_target 'dense_model'`` (fit each block to the dense model's own
  activations) on the rows in $OATS_BENCH_RECON_DM (default ``sparsegpt``).

At 2:4 the N:M part takes the whole 50% budget, so OATS and gram_slr get rank 0 there (rank_ratio is
unused for N:M): a single ``oats-24`` / ``gram_slr-24`` row each (OATS = Wanda-like thresholding of the
scaled weight, gram_slr = row-scoped SparseGPT), no ``-k`` variants.

$OATS_BENCH_ROWS: comma-separated shell patterns (fnmatch) on the names; only matching rows are listed.
$OATS_BENCH_DEVICE: 'auto' (default), 'cpu' or 'cuda'.
$OATS_BENCH_ZS: comma-separated patterns; matching rows also run the zero-shot suite (``ZERO_SHOT``, lm_eval,
the first $OATS_BENCH_ZS_LIMIT examples per task, default 100; 'none' = full files) after WikiText-2, on the
same compressed model. Zero-shot keys do not change the compressed model, so the quality report groups
such a row with its other seeds (``tools/report_quality.py``).
"""
import fnmatch
import os

from ml_collections import ConfigDict

from configs import base
from configs.base import ZERO_SHOT

SEEDS = (1, 2, 3)
RATIOS = (0.0, 0.1, 0.2, 0.3)
RECON = [r for r in os.environ.get("OATS_BENCH_RECON", "sparsegpt-optima,oats-optima-k0.3,gram_slr-k0.3").split(",") if r]
RECON_DM = [r for r in os.environ.get("OATS_BENCH_RECON_DM", "sparsegpt").split(",") if r]

BASE = {**base.WIKITEXT, "device": os.environ.get("OATS_BENCH_DEVICE", "auto")}

# compression label -> (sparsity, sparsity_type)
SETTINGS = {"50": (0.5, "unstructured"), "70": (0.7, "unstructured"), "24": (0.5, "2:4")}


def _ratio(k: float) -> str:
    return f"k{k:g}" if k else "k0"


def _methods(label: str) -> list[tuple[str, dict]]:
    """(row name without compression/seed, config overrides) for one compression setting."""
    structured = SETTINGS[label][1] != "unstructured"
    rows: list[tuple[str, dict]] = [
        ("wanda", dict(method="wanda")),
        ("sparsegpt", dict(method="sparsegpt")),
        ("sparsegpt-optima", dict(method="sparsegpt", weight_update="optima")),
    ]
    distill = dict(method="sparsegpt", model_update="masked_distill")
    # the recipe's step size and count: 3x the learning rate, 4x the Adam steps (one window a step)
    lr3, bs1 = dict(recovery_lr=3e-4), dict(recovery_batch_size=1)
    rows.append(("sparsegpt-distill", distill))
    rows += [(f"sparsegpt-distill-{tag}", {**distill, **over})
             for tag, over in (("lr3e-4", lr3), ("bs1", bs1), ("lr3e-4-bs1", {**lr3, **bs1}))]
    distill_64k = {**distill, "cal_nsamples": 128, "recovery_epochs": 4}
    rows.append(("sparsegpt-distill-64k-e4", distill_64k))
    rows.append(("sparsegpt-distill-64k-e4-bs1", {**distill_64k, **bs1}))
    rows.append(("sparsegpt-distill-64k-e4-bs1-p3", {**distill_64k, **bs1, "recovery_patience": 3}))
    if not structured:
        rows.append(("owl-sparsegpt", dict(method="sparsegpt", layerwise="owl")))
        rows.append(("owl-sparsegpt-distill-64k-e4-lr3e-4-bs1", {**distill_64k, "layerwise": "owl", **lr3, **bs1}))
    if structured:
        rows += [
            ("oats", dict(method="oats", rank_ratio=0.0)),
            ("oats-optima", dict(method="oats", rank_ratio=0.0, weight_update="optima")),
            ("oats-distill", dict(method="oats", rank_ratio=0.0, model_update="masked_distill")),
            ("gram_slr", dict(method="gram_slr", rank_ratio=0.0, gram_slr_sparse_step="optima")),
        ]
    else:
        rows += [(f"oats-{_ratio(k)}", dict(method="oats", rank_ratio=k)) for k in RATIOS]
        rows.append(("oats-optima-k0.3", dict(method="oats", rank_ratio=0.3, weight_update="optima")))
        rows.append(("oats-k0.3-recovery", dict(method="oats", rank_ratio=0.3, model_update="lowrank_recovery")))
        rows.append(("oats-k0.3-recovery-e8", dict(method="oats", rank_ratio=0.3, model_update="lowrank_recovery", recovery_epochs=8)))
        rows.append(("oats-k0.3-recovery-64k", dict(method="oats", rank_ratio=0.3, model_update="lowrank_recovery", cal_nsamples=128)))
        rows.append(("oats-k0.3-recovery-64k-e4", dict(method="oats", rank_ratio=0.3, model_update="lowrank_recovery", cal_nsamples=128,
                                                       recovery_epochs=4)))
        rows.append(("oats-k0.3-distill", dict(method="oats", rank_ratio=0.3, model_update="masked_distill")))
        rows += [(f"gram_slr-{_ratio(k)}", dict(method="gram_slr", rank_ratio=k, gram_slr_sparse_step="optima")) for k in RATIOS]
        # stronger dampening: on one SmolLM2 block it narrowed gram_slr's calibration/held-out gap (sparse_lowrank/gram_slr.py)
        rows.append(("gram_slr-k0.3-d0.1", dict(method="gram_slr", rank_ratio=0.3, gram_slr_sparse_step="optima", percdamp=0.1)))
    # at 2:4 the rank-0 rows have no '-k' in their names: 'oats-optima-k0.3' selects 'oats-optima' there
    wanted = RECON if not structured else [r.split("-k")[0] for r in RECON]
    recon = [(f"{name}-recon", {**over, "block_update": "reconstruct"}) for name, over in rows if name in wanted]
    wanted_dm = RECON_DM if not structured else [r.split("-k")[0] for r in RECON_DM]
    recon += [(f"{name}-recon-dm", {**over, "block_update": "reconstruct", "recon_target": "dense_model"})
              for name, over in rows if name in wanted_dm]
    return rows + recon


def _name(row: str, label: str, seed: int) -> str:
    method, _, rest = row.partition("-k")
    if rest:  # 'oats-k0.3' -> 'oats-50-k0.3'; 'oats-optima-k0.3-recon' -> 'oats-optima-50-k0.3-recon'
        return f"{method}-{label}-k{rest}-s{seed}"
    for marker in ("-recon-dm", "-recon", "-distill-"):
        head, sep, tail = row.partition(marker)
        if sep:  # 'sparsegpt-distill-64k-e4-bs1' -> 'sparsegpt-24-distill-64k-e4-bs1' ('sparsegpt-distill' -> 'sparsegpt-distill-24')
            return f"{head}-{label}{sep}{tail}-s{seed}"
    return f"{row}-{label}-s{seed}"


def build() -> list[ConfigDict]:
    cfgs = [base.experiment(BASE, name="dense", method="dense", seed=SEEDS[0])]
    for label, (sparsity, stype) in SETTINGS.items():
        for seed in SEEDS:
            for row, over in _methods(label):
                cfgs.append(base.experiment(BASE, name=_name(row, label, seed), sparsity=sparsity, sparsity_type=stype,
                                            seed=seed, **over))
    zs = [p for p in os.environ.get("OATS_BENCH_ZS", "").split(",") if p]
    limit = os.environ.get("OATS_BENCH_ZS_LIMIT", "100")
    for c in cfgs:
        if any(fnmatch.fnmatchcase(c.name, p) for p in zs):
            c.zero_shot_tasks = list(ZERO_SHOT)
            c.zero_shot_limit = None if limit == "none" else int(limit)
            c.zero_shot_batch_size = 16
    patterns = [p for p in os.environ.get("OATS_BENCH_ROWS", "").split(",") if p]
    if patterns:
        cfgs = [c for c in cfgs if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return cfgs


CONFIGS = build()

"""The protocols the experiment lists share; each list adds its own budget and experiments.

A list imports these (``from configs.base import WIKITEXT, experiment``), which works wherever
``main.py`` runs it: the repository root is then on ``sys.path``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

from ml_collections import ConfigDict

# The data root of the lists that read files (C4 stand-in, WikiText-2, vision): $OATS_DATA_DIR, else ../shared/data.
DATA = os.environ.get("OATS_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

ZERO_SHOT = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]

# SmolLM2-135M on CPython's pydoc corpus (offline, nothing to download); each list sets its token budget.
PYDOC = dict(
    model="smollm2-135m",
    cal_dataset="pydoc",
    eval_datasets=["pydoc"],
    dtype="float32",
    device="auto",
)

# The README's protocol: SmolLM2-135M calibrated on the C4 stand-in of DATA (its 200-document train
# part), random windows, 32 x 512 tokens; WikiText-2 test (raw, rows joined by "\n\n") in windows of
# 512 tokens, the first 64 windows (32,768 tokens). Seed and device are set by each list.
WIKITEXT = dict(
    model="smollm2-135m",
    cal_dataset="c4",
    cal_sampler="random_windows",
    cal_nsamples=32,
    cal_seqlen=512,
    eval_datasets=["wikitext2"],
    eval_seqlen=512,
    eval_max_windows=64,
    data_dir=DATA,
    dtype="float32",
)


def experiment(base: Mapping[str, Any], **overrides: Any) -> ConfigDict:
    """One experiment: ``base`` with ``overrides`` on top. Copied, so that no experiment shares a list
    with these protocols (this module stays loaded while ``main.py`` reads several lists)."""
    return ConfigDict(copy.deepcopy({**base, **overrides}))

"""The experiment list `python main.py` runs. Each entry is an ml_collections.ConfigDict holding any
subset of the keys in oats/config.py (README: "Config keys"); the rest take their defaults.

The shipped list runs offline on the embedded SmolLM2-135M with the embedded pydoc corpus, sized for a
2-core CPU: 32 calibration windows of 512 tokens, perplexity on the first 16 windows of 512 tokens.
"""
from ml_collections import ConfigDict

# Shared by every experiment below (CPU-sized; the papers use 128 x 2048 calibration tokens).
BASE = dict(
    model="smollm2-135m",
    cal_dataset="pydoc",
    cal_nsamples=32,
    cal_seqlen=512,
    eval_datasets=["pydoc"],
    eval_seqlen=512,
    eval_max_windows=16,
    dtype="float32",
    device="auto",
)


def experiment(**overrides) -> ConfigDict:
    return ConfigDict({**BASE, **overrides})


CONFIGS = [
    experiment(name="dense", method="dense"),
    experiment(name="magnitude-50", method="magnitude", sparsity=0.5),
]

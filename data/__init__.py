"""Text corpora for calibration and evaluation, on- and offline.

Every data set has a hub path (what Wanda/SparseGPT load through ``datasets``) and a local layout
(the one of ``../shared/data/``) used when ``data_dir`` (or env ``OATS_DATA_DIR``) is set; ``pydoc``
is embedded in CPython and always offline.
"""
from data.sources import DATASET_NAMES, DataError, corpus_fingerprint, load_docs, resolve_data_dir  # noqa: F401
from data.tokens import calibration_windows, eval_tokens  # noqa: F401

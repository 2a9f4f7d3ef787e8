"""Experiment configuration: every key, its default, its type and its allowed values, in one table.

An experiment is an ``ml_collections.ConfigDict`` holding any subset of the keys in :data:`KEYS`;
:func:`resolve` fills in the defaults and validates everything *before* any model is loaded, raising
:class:`ConfigError` with a message that names the key and the allowed values.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import ml_collections

EMBEDDED_MODELS = ("smollm2-135m",)
DATASETS = ("pydoc", "wikitext2", "c4", "ptb")
SAMPLERS = ("random_windows", "concat_docs")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
_NM = re.compile(r"^(\d+):(\d+)$")


class ConfigError(ValueError):
    """A config key holds a value that is not allowed. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str, experiment: str | None = None):
        self.key = key
        where = f"experiment {experiment!r}: " if experiment else ""
        super().__init__(f"{where}config key '{key}': {message}")


@dataclass(frozen=True)
class Key:
    """One config key: its default, accepted Python types, an optional extra check, and its doc line."""

    default: Any
    types: tuple[type, ...]
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns an error message, or None if fine
    nullable: bool = False


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"got {v!r}; allowed values: {', '.join(map(repr, allowed))}"

    return check


def _interval(lo: float, hi: float, lo_closed: bool = True, hi_closed: bool = False):
    def check(v: Any) -> str | None:
        ok = (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)
        if ok:
            return None
        lb, rb = ("[" if lo_closed else "("), ("]" if hi_closed else ")")
        return f"got {v!r}; must lie in {lb}{lo}, {hi}{rb}"

    return check


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"got {v!r}; must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"got {v!r}; must be >= 0"


def _sparsity_type(v: str) -> str | None:
    if v == "unstructured":
        return None
    m = _NM.match(v)
    if not m:
        return f"got {v!r}; allowed values: 'unstructured' or 'N:M' such as '2:4' (N kept of every M)"
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        return f"got {v!r}; N:M needs 0 < N < M (N weights kept in every M along the input dimension)"
    return None


def _datasets(v: Sequence[str]) -> str | None:
    from data import DATASET_NAMES  # late import: data/ registers its sources

    bad = [d for d in v if d not in DATASET_NAMES]
    return f"unknown data set(s) {bad}; allowed values: {list(DATASET_NAMES)}" if bad else None


def _method(v: str) -> str | None:
    from oats.registry import METHODS

    return None if v in METHODS else f"got {v!r}; allowed values: {sorted(METHODS)}"


def _zero_shot_tasks(v: Sequence[str]) -> str | None:
    from eval.zero_shot import ZERO_SHOT_TASKS

    bad = [t for t in v if t not in ZERO_SHOT_TASKS]
    return f"unknown task(s) {bad}; allowed values: {list(ZERO_SHOT_TASKS)}" if bad else None


def _mmlu_subjects(v: Sequence[str]) -> str | None:
    from eval.zero_shot import MMLU_SUBJECTS

    bad = [t for t in v if t not in MMLU_SUBJECTS]
    if bad:
        return f"unknown subject(s) {bad}; allowed values: the 57 MMLU subjects {list(MMLU_SUBJECTS)}"
    return None if v else "got an empty list; use None for all 57 subjects"


def _cal_dataset(v: str) -> str | None:
    from data import DATASET_NAMES

    return None if v in DATASET_NAMES else f"got {v!r}; allowed values: {list(DATASET_NAMES)}"


KEYS: dict[str, Key] = {
    # --- what to run -------------------------------------------------------------------------
    "name": Key(None, (str,), "experiment name; results go to `<out>/<name>/` (default: derived from model, method, sparsity)", nullable=True),
    "model": Key(None, (str,), "`smollm2-135m` (embedded, offline), a local model directory, or a hub id", nullable=True),
    "method": Key("dense", (str,), "compression method, see the methods table", _method),
    "sparsity": Key(0.5, (float, int), "fraction of each layer's parameters removed (for OATS: the compression rate)", _interval(0.0, 1.0)),
    "sparsity_type": Key("unstructured", (str,), "`unstructured` or `N:M` (N kept in every M consecutive inputs, e.g. `2:4`)", _sparsity_type),
    "mask_scope": Key(None, (str,), "where weights compete for survival: `row` (per output row) or `layer`; None = the method's own default", _choice("row", "layer"), nullable=True),
    "layerwise": Key("uniform", (str,), "per-block sparsity allocation: `uniform` or `owl` (outlier-weighted, Yin et al. 2024)", _choice("uniform", "owl")),
    "owl_m": Key(5.0, (float, int), "OWL outlier threshold M: a Wanda score is an outlier above M times its layer's mean", _positive),
    "owl_lambda": Key(0.08, (float, int), "OWL: per-block sparsities spread within +-lambda of the target", _interval(0.0, 1.0)),
    "update": Key("none", (str,), "weight update after the mask: `none` (the method's own) or `optima` (row-wise QP reconstruction)", _choice("none", "optima")),
    # --- OATS ----------------------------------------------------------------------------------
    "rank_ratio": Key(0.3, (float, int), "OATS kappa: share of the kept parameters given to the low-rank part", _interval(0.0, 1.0)),
    "num_iters": Key(80, (int,), "OATS alternating-thresholding iterations (paper: 80)", _positive),
    "svd": Key("fast", (str,), "OATS low-rank step: `fast` (warm-started subspace iteration) or `exact` (full SVD each iteration)", _choice("fast", "exact")),
    "svd_tol": Key(1e-2, (float,), "OATS `svd: fast`: subspace iteration stops once the top-r Ritz residual is below this fraction of the rank-r error", _interval(0.0, 1.0, lo_closed=False)),
    "compress": Key(False, (bool,), "OATS: replace linears by sparse + low-rank modules (True) or sum S + UV into dense weights (False)"),
    # --- SparseGPT -----------------------------------------------------------------------------
    "percdamp": Key(0.01, (float, int), "SparseGPT/OPTIMA dampening: fraction of the mean Hessian diagonal added to it", _non_negative),
    "blocksize": Key(128, (int,), "SparseGPT column block size (mask chosen per block)", _positive),
    # --- OPTIMA --------------------------------------------------------------------------------
    "optima_tol": Key(1e-6, (float,), "OPTIMA batched solver: relative residual tolerance", _positive),
    "optima_max_iters": Key(500, (int,), "OPTIMA batched solver: iteration cap", _positive),
    "optima_dtype": Key("float32", (str,), "OPTIMA solver precision", _choice("float32", "float64")),
    # --- calibration ---------------------------------------------------------------------------
    "cal_dataset": Key("pydoc", (str,), "calibration corpus", _cal_dataset),
    "cal_nsamples": Key(128, (int,), "number of calibration windows", _positive),
    "cal_seqlen": Key(2048, (int,), "tokens per calibration window", _positive),
    "cal_sampler": Key("random_windows", (str,), "`random_windows` (Wanda/SparseGPT, seeded) or `concat_docs` (OATS/SliceGPT: consecutive documents joined and cut)", _choice(*SAMPLERS)),
    "cal_batch_size": Key(8, (int,), "calibration windows per forward pass through a block", _positive),
    "stats_dtype": Key("float32", (str,), "precision of the accumulated input statistics (Gram matrices)", _choice("float32", "float64")),
    "seed": Key(0, (int,), "seed for calibration sampling and any randomness in methods"),
    # --- evaluation ----------------------------------------------------------------------------
    "eval_datasets": Key(("pydoc",), (list, tuple), "token-perplexity data sets (test split)", _datasets),
    "eval_seqlen": Key(2048, (int,), "tokens per perplexity window (always stated next to the numbers)", _positive),
    "eval_max_windows": Key(None, (int,), "cap on the number of perplexity windows (None = all)", _positive, nullable=True),
    "eval_batch_size": Key(1, (int,), "perplexity windows per forward pass", _positive),
    "word_perplexity": Key(False, (bool,), "also compute lm_eval's document-level `wikitext` word perplexity"),
    "zero_shot_tasks": Key((), (list, tuple), "lm_eval zero-shot tasks (empty = none), e.g. `boolq`, `arc_easy`, `mmlu`", _zero_shot_tasks),
    "zero_shot_limit": Key(None, (int,), "lm_eval examples per task (None = all)", _positive, nullable=True),
    "zero_shot_batch_size": Key(8, (int,), "lm_eval batch size", _positive),
    "zero_shot_fewshot": Key(0, (int,), "lm_eval few-shot examples for the zero-shot tasks", _non_negative),
    "mmlu_subjects": Key(None, (list, tuple), "MMLU subjects (None = all 57); the OATS reference's 10 are in `eval.zero_shot.OATS_MMLU_SUBJECTS`", _mmlu_subjects, nullable=True),
    "mmlu_fewshot": Key(5, (int,), "MMLU few-shot examples", _non_negative),
    # --- where and how -------------------------------------------------------------------------
    "data_dir": Key(None, (str,), "local data root laid out like `../shared/data/` (else env `OATS_DATA_DIR`, else the hub)", nullable=True),
    "dtype": Key("float32", (str,), "model weights dtype", _choice(*DTYPES)),
    "device": Key("auto", (str,), "compute device (`auto` = cuda when present)", _choice(*DEVICES)),
    "checkpoint_blocks": Key(False, (bool,), "checkpoint after every compressed block so a killed run resumes there"),
    "lazy_load": Key(False, (bool,), "big-model path: read each block's weights from the safetensors shards just before it is compressed, write it to `<out>/<name>/model` shard by shard, evaluate streaming block by block (peak memory ~ one block + activations)"),
    "save_model": Key(False, (bool,), "save the compressed model under `<out>/<name>/model`"),
}

# Keys that change nothing in the result; they are left out of the config hash.
NON_RESULT_KEYS = frozenset({"checkpoint_blocks", "lazy_load"})


def parse_nm(sparsity_type: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4) (N kept of every M); 'unstructured' -> None."""
    m = _NM.match(sparsity_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_type(key: str, spec: Key, value: Any, exp: str | None) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(key, f"must not be None; expected {'/'.join(t.__name__ for t in spec.types)}", exp)
    if isinstance(value, bool) and bool not in spec.types:
        raise ConfigError(key, f"got bool {value!r}; expected {'/'.join(t.__name__ for t in spec.types)}", exp)
    if not isinstance(value, spec.types):
        raise ConfigError(
            key, f"got {type(value).__name__} {value!r}; expected {'/'.join(t.__name__ for t in spec.types)}", exp
        )
    if isinstance(value, (list, tuple)):
        value = list(value)
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"got {value!r}; expected a list of strings", exp)
    if spec.check is not None:
        msg = spec.check(value)
        if msg:
            raise ConfigError(key, msg, exp)
    return value


def default_name(cfg: Mapping[str, Any]) -> str:
    model = str(cfg["model"]).rstrip("/").split("/")[-1]
    parts = [model, cfg["method"]]
    if cfg["method"] != "dense":
        parts.append(f"{cfg['sparsity']:g}")
        if cfg["sparsity_type"] != "unstructured":
            parts.append(cfg["sparsity_type"].replace(":", "of"))
        if cfg["layerwise"] != "uniform":
            parts.append(cfg["layerwise"])
        if cfg["update"] != "none":
            parts.append(cfg["update"])
    return "-".join(parts)


def resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict, index: int | None = None) -> ml_collections.ConfigDict:
    """Fill defaults into one experiment and validate every key. Returns a new locked ConfigDict."""
    raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    exp = raw.get("name") or (f"#{index}" if index is not None else None)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, KEYS, 1)[0]!r}?)" if difflib.get_close_matches(u, KEYS, 1) else repr(u) for u in unknown]
        raise ConfigError(unknown[0], f"unknown key(s) {', '.join(hints)}; allowed keys: {', '.join(KEYS)}", exp)
    out: dict[str, Any] = {}
    for key, spec in KEYS.items():
        value = raw.get(key, spec.default)
        if isinstance(value, tuple):
            value = list(value)
        out[key] = _check_type(key, spec, value, exp)
    if not out["model"]:
        raise ConfigError("model", f"missing; give {' or '.join(EMBEDDED_MODELS)}, a local model directory or a hub id", exp)
    if out["sparsity_type"] != "unstructured" and out["method"] in ("dense",):
        raise ConfigError("sparsity_type", "N:M needs a compressing method, not 'dense'", exp)
    if out["layerwise"] == "owl":
        from oats.registry import METHODS

        if not METHODS[out["method"]].supports_owl:
            allowed = sorted(n for n, m in METHODS.items() if m.supports_owl)
            raise ConfigError("layerwise", f"'owl' does not apply to method {out['method']!r}; allowed methods: {allowed}", exp)
        if out["sparsity_type"] != "unstructured":
            raise ConfigError("layerwise", f"'owl' sets a sparsity per block, which an N:M pattern ({out['sparsity_type']}) fixes; allowed with 'owl': sparsity_type 'unstructured'", exp)
        lam = out["owl_lambda"]
        if not (0.0 <= out["sparsity"] - lam and out["sparsity"] + lam < 1.0):
            raise ConfigError("owl_lambda", f"sparsity {out['sparsity']} +- owl_lambda {lam} must stay inside [0, 1)", exp)
    if out["method"] == "oats":
        if out["mask_scope"] not in (None, "row"):
            raise ConfigError("mask_scope", f"got {out['mask_scope']!r}; OATS thresholds per row: allowed values None, 'row'", exp)
        nm = parse_nm(out["sparsity_type"])
        if nm is not None:
            from fractions import Fraction

            if 1 - Fraction(repr(float(out["sparsity"]))) < Fraction(nm[0], nm[1]):
                raise ConfigError("sparsity", f"OATS compression rate {out['sparsity']!r} keeps fewer parameters than the sparse part "
                                  f"of sparsity_type {out['sparsity_type']!r} holds ({nm[0]}/{nm[1]} of each layer); with N:M the low-rank "
                                  f"part takes the rest of the budget and rank_ratio is unused: allowed sparsity <= 1 - N/M = {1 - nm[0] / nm[1]:g}", exp)
    if out["update"] == "optima":
        from oats.registry import METHODS

        if not METHODS[out["method"]].supports_update:
            allowed = sorted(n for n, m in METHODS.items() if m.supports_update)
            raise ConfigError("update", f"'optima' needs a mask-producing method; allowed methods: {allowed}", exp)
    if out["lazy_load"]:
        if out["compress"]:
            raise ConfigError("lazy_load", "True needs compress=False (factored modules are not written shard by shard yet); allowed with lazy_load: compress False", exp)
        if out["layerwise"] != "uniform":
            raise ConfigError("lazy_load", f"True needs layerwise 'uniform' (the {out['layerwise']!r} allocator reads the whole dense model); allowed with lazy_load: layerwise 'uniform'", exp)
        if out["word_perplexity"] or out["zero_shot_tasks"]:
            raise ConfigError("lazy_load", "True evaluates token perplexity only (streamed block by block); set word_perplexity False and zero_shot_tasks [] or run lm_eval on the saved model", exp)
    if out["name"] is None:
        out["name"] = default_name(out)
    if not re.match(r"^[A-Za-z0-9._+=-]+$", out["name"]):
        raise ConfigError("name", f"got {out['name']!r}; use letters, digits and . _ + = - only (it names a directory)", exp)
    return ml_collections.ConfigDict(out)


def resolve_all(cfgs: Sequence[Any]) -> list[ml_collections.ConfigDict]:
    """Resolve a whole experiment list; names must be unique."""
    if not isinstance(cfgs, (list, tuple)):
        raise ConfigError("CONFIGS", f"must be a list of ConfigDicts, got {type(cfgs).__name__}")
    resolved = [resolve(c, i) for i, c in enumerate(cfgs)]
    seen: dict[str, int] = {}
    for i, c in enumerate(resolved):
        if c.name in seen:
            raise ConfigError("name", f"{c.name!r} is used by experiments #{seen[c.name]} and #{i}; names must be unique")
        seen[c.name] = i
    return resolved


def config_hash(cfg: ml_collections.ConfigDict) -> str:
    """Stable 16-hex-digit hash of everything that can change an experiment's result."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_KEYS}
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def keys_markdown() -> str:
    """The config keys table for the README."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k, s in KEYS.items():
        rows.append(f"| `{k}` | `{s.default!r}` | {s.doc} |")
    return "\n".join(rows)

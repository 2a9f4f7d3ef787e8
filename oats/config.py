"""Experiment configuration: the common keys, merged with the keys of the plugins an experiment selects.

An experiment is an ``ml_collections.ConfigDict`` holding any subset of the keys in :data:`COMMON_KEYS`
plus those of its method, layerwise plugin and updates (each plugin declares its own, see
``oats.interface``). :func:`resolve` fills in the defaults and validates everything *before* any model
is loaded, raising ``ConfigError`` with a message naming the key and the allowed values; a key that
belongs to a plugin the experiment does not select is an error naming that plugin.

:func:`config_hash` covers the common keys and the selected plugins' keys, so one method's defaults
never stale another method's results. Records written before plugins owned their keys carry the
hash of the old flat key table; :func:`legacy_config_hash` reproduces it, so they stay done.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from typing import Any, Mapping, Sequence

import ml_collections

from oats import registry
from oats.keys import ConfigError, Key, choice, interval, merge_keys, non_negative, parse_nm, positive, sparsity_type_check  # noqa: F401
from factored.forward import CANDIDATES as FORWARDS

log = logging.getLogger(__name__)

EMBEDDED_MODELS = ("smollm2-135m", "dinov2-small-imgfocus")
SAMPLERS = ("random_windows", "concat_docs")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*$")  # a directory name; never '.' or '..'
HASH_VERSION = 2
# Old key names still accepted, with a hint: ConfigDict.update is the dict method, so cfg.update shadowed the key.
RENAMED = {"update": "weight_update"}


def _datasets(v: Sequence[str]) -> str | None:
    from data import DATASET_NAMES

    bad = [d for d in v if d not in DATASET_NAMES]
    return f"unknown data set(s) {bad}; allowed values: {list(DATASET_NAMES)}" if bad else None


def _cal_dataset(v: str | list[str]) -> str | None:
    from data import DATASET_NAMES
    from data.self_generated import SELF_GENERATED
    from data.vision import VISION_DATASETS

    if isinstance(v, str):
        return choice(*DATASET_NAMES, SELF_GENERATED, *VISION_DATASETS)(v)
    if not v:
        return "got an empty list; name one calibration source, or several to mix them (with cal_mix)"
    images = [d for d in v if d in VISION_DATASETS]
    if images:
        return f"got {v!r}; image data sets ({', '.join(images)}) cannot be mixed: give one as a string"
    bad = [d for d in v if d not in (*DATASET_NAMES, SELF_GENERATED)]
    if bad:
        return f"unknown source(s) {bad} in {v!r}; allowed values in a mix: {', '.join(map(repr, (*DATASET_NAMES, SELF_GENERATED)))}"
    twice = sorted({d for d in v if v.count(d) > 1})
    return f"names {twice} more than once; name each source once and give its share in cal_mix" if twice else None


def _update_dataset(v: str) -> str | None:
    from data import DATASET_NAMES
    from data.self_generated import SELF_GENERATED

    return choice(*DATASET_NAMES, SELF_GENERATED)(v)


def _cal_mix(v: list[float] | None) -> str | None:
    if any(s <= 0 for s in v):
        return f"got {v!r}; every share must be > 0 (leave a source out of cal_dataset instead)"
    return None if abs(sum(v) - 1.0) <= 1e-6 else f"got {v!r}, which sums to {sum(v):g}; the shares must sum to 1"


def _vision_evals(v: Sequence[str]) -> str | None:
    from eval.vision import VISION_EVALS

    bad = [t for t in v if t not in VISION_EVALS]
    return f"unknown vision evaluation(s) {bad}; allowed values: {list(VISION_EVALS)}" if bad else None


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


def _plugin_name(table: Mapping[str, str], builtin: tuple[str, ...] = ()):
    def check(v: str) -> str | None:
        return choice(*builtin, *sorted(table))(v)

    return check


def _device_map(v: Any) -> str | None:
    from oats.placement import DEVICE_PATTERN as DEVICE_NAME, STRATEGIES, map_problem

    if isinstance(v, str):
        msg = choice(*STRATEGIES)(v)
        whole = f" ({{'': {v!r}}} puts the whole model there)" if msg and DEVICE_NAME.match(v) else ""
        return msg and f"{msg}; or an explicit map {{module: 'cuda:N' | 'cpu' | 'disk'}}{whole} (a dict, or a list of 'module=device' strings)"
    return map_problem(v)


def _stats_device(v: str) -> str | None:
    if v in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", v):
        return None
    return f"got {v!r}; allowed values: 'cpu', 'cuda', 'cuda:N' (or None: where the block computes, `device`)"


def _max_memory(v: Any) -> str | None:
    from oats.placement import memory_problem

    return memory_problem(v)


def _offload_dir(v: str) -> str | None:
    return None if v.strip() else "got an empty string; give a folder path, or None for <out>/<name>/offload"


def _seed(v: int) -> str | None:
    return None if 0 <= v < 2**63 else f"got {v!r}; must lie in [0, 2**63) (it seeds torch and Python's random)"


COMMON_KEYS: dict[str, Key] = {
    # --- what to run -------------------------------------------------------------------------
    "name": Key(None, (str,), "experiment name; results go to `<out>/<name>/` (default: derived from model, method, sparsity)", nullable=True),
    "model": Key(None, (str,), "`smollm2-135m` (embedded, offline), a local model directory, or a hub id", nullable=True),
    "method": Key("dense", (str,), "compression method, see the methods table", _plugin_name(registry.METHODS)),
    "sparsity": Key(0.5, (float, int), "fraction of each layer's parameters removed (for OATS: the compression rate)", interval(0.0, 1.0)),
    "sparsity_type": Key("unstructured", (str,), "`unstructured` or `N:M` (N kept in every M consecutive inputs, e.g. `2:4`)", sparsity_type_check),
    "mask_scope": Key(None, (str,), "where weights compete for survival: `row` (per output row) or `layer`; None = the method's own default", choice("row", "layer"), nullable=True),
    "layerwise": Key("uniform", (str,), "per-block sparsity allocation: `uniform` or a layerwise plugin (`owl`: outlier-weighted, Yin et al. 2024)", _plugin_name(registry.LAYERWISE, ("uniform",))),
    "weight_update": Key("none", (str,), "per-layer weight update after the method, mask kept: `none` or `optima` (row-wise QP reconstruction); old name `update`", _plugin_name(registry.WEIGHT_UPDATES, ("none",))),
    "block_update": Key("none", (str,), "per-block update after a block's layers are compressed, masks kept: `none` or a registered block update", _plugin_name(registry.BLOCK_UPDATES, ("none",))),
    "model_update": Key("none", (str,), "end-to-end update of the whole compressed model after the last block, masks and budget kept: `none` or `lowrank_recovery` (the low-rank factors distilled against the dense model's logits)", _plugin_name(registry.MODEL_UPDATES, ("none",)), hash_default=False),
    "targets": Key(None, (list, tuple), "fnmatch patterns of the linear layers to compress (`self_attn.*`, `3.mlp.down_proj`, `qkv_proj:q`); None = all", nullable=True),
    "ignore": Key((), (list, tuple), "fnmatch patterns of linear layers never compressed (matched like `targets`)"),
    # --- calibration ---------------------------------------------------------------------------
    "cal_dataset": Key("pydoc", (str, list, tuple), "calibration corpus: a text corpus, `self_generated` (text sampled from the dense model, see `cal_temperature`), or a list of these mixed by `cal_mix`; `photos`, `fashion_mnist` or `imagefolder` make a vision experiment (see `VISION_KEYS`)", _cal_dataset),
    "cal_nsamples": Key(128, (int,), "number of calibration windows", positive),
    "cal_seqlen": Key(2048, (int,), "tokens per calibration window", positive),
    "cal_sampler": Key("random_windows", (str,), "`random_windows` (Wanda/SparseGPT, seeded) or `concat_docs` (OATS/SliceGPT: consecutive documents joined and cut)", choice(*SAMPLERS)),
    "cal_batch_size": Key(8, (int,), "calibration windows per forward pass through a block", positive),
    "update_dataset": Key(None, (str,), "with a `model_update`: the text its dense targets and training windows come from: None = the calibration windows themselves; a text corpus or `self_generated` = `cal_nsamples` windows of `cal_seqlen` tokens of it, seeded by `seed`, while `cal_dataset` still gives the compression's statistics", _update_dataset, nullable=True, hash_default=False),
    "stats_dtype": Key("float32", (str,), "precision of the accumulated input statistics (Gram matrices)", choice("float32", "float64")),
    "seed": Key(0, (int,), "seed for calibration sampling and any randomness in methods", _seed),
    # --- evaluation ----------------------------------------------------------------------------
    "eval_datasets": Key(("pydoc",), (list, tuple), "token-perplexity data sets (test split)", _datasets),
    "eval_seqlen": Key(2048, (int,), "tokens per perplexity window (always stated next to the numbers)", positive),
    "eval_max_windows": Key(None, (int,), "cap on the number of perplexity windows (None = all)", positive, nullable=True),
    "eval_batch_size": Key(1, (int,), "perplexity windows per forward pass", positive),
    "word_perplexity": Key(False, (bool,), "also compute lm_eval's document-level `wikitext` word perplexity"),
    "zero_shot_tasks": Key((), (list, tuple), "lm_eval zero-shot tasks (empty = none), e.g. `boolq`, `arc_easy`, `mmlu`", _zero_shot_tasks),
    "zero_shot_limit": Key(None, (int,), "lm_eval examples per task (None = all)", positive, nullable=True),
    "zero_shot_batch_size": Key(8, (int,), "lm_eval batch size", positive),
    "zero_shot_fewshot": Key(0, (int,), "lm_eval few-shot examples for the zero-shot tasks", non_negative),
    "mmlu_subjects": Key(None, (list, tuple), "MMLU subjects (None = all 57); the OATS reference's 10 are in `eval.zero_shot.OATS_MMLU_SUBJECTS`", _mmlu_subjects, nullable=True),
    "mmlu_fewshot": Key(5, (int,), "MMLU few-shot examples", non_negative),
    # --- where and how -------------------------------------------------------------------------
    "data_dir": Key(None, (str,), "local data root laid out like `../shared/data/` (else env `OATS_DATA_DIR`, else the hub)", nullable=True),
    "dtype": Key("float32", (str,), "model weights dtype", choice(*DTYPES)),
    "device": Key("auto", (str,), "compute device (`auto` = cuda when present)", choice(*DEVICES)),
    "stats_device": Key(None, (str,), "compression: where the calibration hidden states and the input statistics (Gram matrices) live, `cpu`, `cuda` or `cuda:N`; each batch moves to `device` for the block's forward and back, a layer's statistics move to `device` for its solve; None = `device`", _stats_device, nullable=True, result=False),
    "device_map": Key(None, (str, dict, list, tuple), "evaluate placed across devices by accelerate: `auto`, `balanced`, `balanced_low_0` (the GPUs balanced; `_low_0` keeps GPU 0 lightest) or `sequential` (filled in order), then the CPU, then disk; or an explicit map {module: `cuda:N`, `cpu` or `disk`} (a dict, or a list of `module=device` strings); None = the model on `device`", _device_map, nullable=True, result=False),
    "max_memory": Key(None, (dict,), "with device_map: the most each device may hold, {`cuda:N` or `cpu`: bytes or a size such as `70GiB`, `200MiB`}; a device left out gets nothing; None = what is free", _max_memory, nullable=True, result=False),
    "offload_dir": Key(None, (str,), "with device_map, a model in memory: weights mapped to disk go to `<offload_dir>/<name>` (kept); None = `<out>/<name>/offload` (removed after the evaluation); under lazy_load they are read from the model's shards", _offload_dir, nullable=True, result=False),
    "threads": Key(None, (int,), "torch CPU threads (`torch.set_num_threads`); None = torch's default (all cores)", positive, nullable=True, result=False),
    "checkpoint_blocks": Key(False, (bool,), "checkpoint after every compressed block so a killed run resumes there", result=False),
    "lazy_load": Key(False, (bool,), "big-model path: read each block's weights from the safetensors shards just before it is compressed, write it to `<out>/<name>/model` shard by shard, evaluate streaming block by block (peak memory ~ one block + activations)", result=False),
    "save_model": Key(False, (bool,), "save the compressed model under `<out>/<name>/model`"),
    "export_format": Key(None, (str,), "after the run, export the saved model to `<out>/<name>/export` as `bitmask` (values + 1-bit mask, loadable by stock transformers with trust_remote_code), `peft` (sparse base + LoRA adapter of the low-rank part) or `dense`; needs save_model", choice("bitmask", "peft", "dense"), nullable=True, result=False),
}

# Compress mode: accepted, validated and hashed only when the selected method builds its own module for a
# compressed layer (``Method.build_module``: the sparse + low-rank methods), so they change no other method's hash.
COMPRESS_KEYS: dict[str, Key] = {
    "compress": Key(False, (bool,), "compress mode: replace linears by sparse + low-rank modules (True) or sum S + UV into dense weights (False)"),
    "forward": Key("auto", (str,), "compress mode: how a SparseLowRankLinear computes, `auto` (the fastest measured per device, dtype, shape, density and rows, keeping no dense copy unless `forward_dense_copy`) or one of `dense_merged`, `torch_csr`, `bitmask_kernel`, `dense_kernel`, `densify`; the record says which ran", choice("auto", *FORWARDS), result=False),
    "forward_dense_copy": Key(False, (bool,), "compress mode with `forward: auto`: may also choose the forwards that keep a dense copy of S + UV (`dense_merged`, `dense_kernel`; faster prefill, the dense model's memory); they are always timed as the reference", result=False),
}

# Keys of vision experiments (image transformers): accepted, validated and hashed only when `cal_dataset` is a
# vision data set, so adding them changed no language-model experiment's hash. `cal_nsamples`, `cal_batch_size`,
# `seed`, `eval_batch_size` and `data_dir` are the common keys; `cal_seqlen`, `cal_sampler`, `eval_datasets`... are unused.
VISION_KEYS: dict[str, Key] = {
    "image_size": Key(224, (int,), "vision: images are resized to image_size x image_size (calibration and evaluation)", positive),
    "vision_eval": Key(("fidelity", "probe"), (list, tuple), "vision metrics: `fidelity` (cosine of CLS / patch features to the dense model's), `probe` (linear-probe top-1 on frozen CLS features, Fashion-MNIST), `topk` (classifier top-1/top-5 on `<data_dir>/val/<class>/`)", _vision_evals),
    "probe_train": Key(1000, (int,), "vision: Fashion-MNIST train images (the first ones) the linear probe is fitted on", positive),
    "probe_test": Key(1000, (int,), "vision: Fashion-MNIST test images (the first ones) for the probe's top-1 and the feature fidelity", positive),
    "topk_images": Key(None, (int,), "vision `topk`: at most this many images of `<data_dir>/val/` (None = all)", positive, nullable=True),
}


# Keys of self-generated text, accepted, validated and hashed only when `cal_dataset` names `self_generated`
# (or `update_dataset` is it); the mix's shares only when `cal_dataset` is a list. So neither changed an existing hash.
SELF_GENERATED_KEYS: dict[str, Key] = {
    "cal_temperature": Key(1.0, (float, int), "self_generated: sampling temperature of the dense model's text", positive),
    "cal_top_p": Key(1.0, (float, int), "self_generated: nucleus sampling, the most probable tokens whose mass reaches top_p (1 = all)", interval(0.0, 1.0, lo_closed=False, hi_closed=True)),
}
MIX_KEYS: dict[str, Key] = {
    "cal_mix": Key(None, (list, tuple), "with a list `cal_dataset`: each source's share of the `cal_nsamples` windows, in the list's order, summing to 1 (None = equal shares); counts are rounded by largest remainder and recorded", _cal_mix, nullable=True, item_types=(float, int)),
}


def is_vision_config(raw: Mapping[str, Any]) -> bool:
    """A vision experiment: its calibration data are images."""
    from data.vision import VISION_DATASETS

    return isinstance(raw.get("cal_dataset"), str) and raw.get("cal_dataset") in VISION_DATASETS


def cal_names(raw: Mapping[str, Any]) -> list[str]:
    """The calibration sources ``cal_dataset`` names (one, or a mix's list)."""
    v = raw.get("cal_dataset", COMMON_KEYS["cal_dataset"].default)
    return [v] if isinstance(v, str) else list(v)


def uses_self_generated(raw: Mapping[str, Any]) -> bool:
    """Calibration or model-update text is sampled from the dense model."""
    return self_generated_key(raw) is not None


def self_generated_key(raw: Mapping[str, Any]) -> str | None:
    """The key that asks for text sampled from the dense model (``cal_dataset`` first), else None."""
    from data.self_generated import SELF_GENERATED

    if SELF_GENERATED in cal_names(raw):
        return "cal_dataset"
    return "update_dataset" if raw.get("update_dataset") == SELF_GENERATED else None


def cal_sources(cfg: Mapping[str, Any]) -> list[tuple[str, int]]:
    """[(source, windows)] of a resolved config: ``cal_nsamples`` split over the mix by ``cal_mix``."""
    from data.tokens import mix_counts

    names = cal_names(cfg)
    if len(names) == 1 and isinstance(cfg["cal_dataset"], str):
        return [(names[0], int(cfg["cal_nsamples"]))]
    shares = cfg.get("cal_mix") or [1.0 / len(names)] * len(names)
    return list(zip(names, mix_counts(int(cfg["cal_nsamples"]), list(shares))))


def update_sources(cfg: Mapping[str, Any]) -> list[tuple[str, int]]:
    """[(source, windows)] of a model update's own text (``update_dataset``: ``cal_nsamples`` windows), or []
    when it trains on the calibration windows."""
    v = cfg.get("update_dataset")
    return [] if v is None else [(v, int(cfg["cal_nsamples"]))]


def task_keys(out: Mapping[str, Any]) -> dict[str, Key]:
    """The keys the calibration data bring: vision keys for images; self-generation and mix keys for text."""
    if is_vision_config(out):
        return VISION_KEYS
    return {**(SELF_GENERATED_KEYS if uses_self_generated(out) else {}),
            **(MIX_KEYS if not isinstance(out.get("cal_dataset"), str) else {})}


def mode_keys(plugins: Mapping[str, Any]) -> dict[str, Key]:
    """The compress-mode keys when the selected method has a compress mode, else none."""
    return COMPRESS_KEYS if plugins["method"].build_module is not None else {}


# The flat key table of records without a hash_version (written before plugins owned their keys),
# default by key, in its order: what their hash covered. Only legacy_config_hash reads it.
LEGACY_DEFAULTS: dict[str, Any] = {
    "name": None, "model": None, "method": "dense", "sparsity": 0.5, "sparsity_type": "unstructured", "mask_scope": None,
    "layerwise": "uniform", "owl_m": 5.0, "owl_lambda": 0.08, "update": "none", "rank_ratio": 0.3, "num_iters": 80,
    "svd": "fast", "svd_tol": 0.01, "compress": False, "percdamp": 0.01, "blocksize": 128, "optima_tol": 1e-06,
    "optima_max_iters": 500, "optima_dtype": "float32", "cal_dataset": "pydoc", "cal_nsamples": 128, "cal_seqlen": 2048,
    "cal_sampler": "random_windows", "cal_batch_size": 8, "stats_dtype": "float32", "seed": 0, "eval_datasets": ["pydoc"],
    "eval_seqlen": 2048, "eval_max_windows": None, "eval_batch_size": 1, "word_perplexity": False, "zero_shot_tasks": [],
    "zero_shot_limit": None, "zero_shot_batch_size": 8, "zero_shot_fewshot": 0, "mmlu_subjects": None, "mmlu_fewshot": 5,
    "data_dir": None, "dtype": "float32", "device": "auto", "checkpoint_blocks": False, "lazy_load": False, "save_model": False,
}
_LEGACY_NON_RESULT = ("checkpoint_blocks", "lazy_load")


def selected_plugins(raw: Mapping[str, Any]) -> dict[str, Any]:
    """{'method': Method, 'layerwise': Layerwise?, 'weight_update': WeightUpdate?, 'block_update': BlockUpdate?,
    'model_update': ModelUpdate?}
    of a resolved (or at least type-checked) config: each kind under the key that selects it."""
    out: dict[str, Any] = {"method": registry.method(raw["method"])}
    for kind, none in registry.BUILTIN.items():
        if raw.get(kind, none) != none:
            out[kind] = registry.plugin(kind, raw[kind])
    return out


def plugin_keys(plugins: Mapping[str, Any]) -> dict[str, Key]:
    return merge_keys({f"{kind} {p.name!r}": p.keys for kind, p in plugins.items()})


def key_owners() -> dict[str, tuple[Key, list[str]]]:
    """Every key any config may hold: {key: (its declaration, its owners)}, in declaration order. Owners
    are 'common', 'vision', 'self_generated', 'calibration mix', 'compress mode' or "<kind> '<name>'" for each
    registered plugin declaring it."""
    out: dict[str, tuple[Key, list[str]]] = {}
    for owner, table in (("common", COMMON_KEYS), ("vision", VISION_KEYS), ("self_generated", SELF_GENERATED_KEYS),
                         ("calibration mix", MIX_KEYS), ("compress mode", COMPRESS_KEYS)):
        for k, spec in table.items():
            out[k] = (spec, [owner])
    for kind in registry.KINDS:
        for name, p in registry.declared(kind).items():
            for k, spec in p.keys.items():
                out.setdefault(k, (spec, []))[1].append(f"{kind} {name!r}")
    return out


def _owner_of(key: str) -> list[str]:
    """"method 'oats'" ... for every registered plugin that declares ``key`` (for the error message)."""
    return [o for o in key_owners().get(key, (None, []))[1] if o not in ("common", "vision", "self_generated", "calibration mix", "compress mode")]


def all_known_keys() -> list[str]:
    return list(key_owners())


def default_name(cfg: Mapping[str, Any], compresses: bool = True) -> str:
    model = str(cfg["model"]).rstrip("/").split("/")[-1]
    parts = [model, cfg["method"]]
    if compresses:
        parts.append(f"{cfg['sparsity']:g}")
        if cfg["sparsity_type"] != "unstructured":
            parts.append(cfg["sparsity_type"].replace(":", "of"))
        if cfg["layerwise"] != "uniform":
            parts.append(cfg["layerwise"])
        if cfg["weight_update"] != "none":
            parts.append(cfg["weight_update"])
        if cfg["block_update"] != "none":
            parts.append(cfg["block_update"])
        if cfg.get("model_update", "none") != "none":
            parts.append(cfg["model_update"])
    return "-".join(parts)


def _rename_old_keys(raw: dict[str, Any]) -> None:
    for old, new in RENAMED.items():
        if old in raw:
            if new in raw:
                raise ConfigError(old, f"is the old name of {new!r}; give only {new!r}")
            log.warning("config key %r is now called %r (ConfigDict.update is the dict method); please rename it", old, new)
            raw[new] = raw.pop(old)


def resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict, index: int | None = None) -> ml_collections.ConfigDict:
    """Fill defaults into one experiment and validate every key. Returns a new ConfigDict."""
    if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
        where = f"CONFIGS[{index}]" if index is not None else "an experiment"
        raise ConfigError("CONFIGS", f"{where} is {type(cfg).__name__} {cfg!r}; each entry must be an ml_collections.ConfigDict (or dict)")
    raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    exp = raw.get("name") if isinstance(raw.get("name"), str) else (f"#{index}" if index is not None else None)
    try:
        return _resolve(raw)
    except ConfigError as e:
        raise e.within(exp) from None


def _resolve(raw: dict[str, Any]) -> ml_collections.ConfigDict:
    _rename_old_keys(raw)
    out: dict[str, Any] = {}
    for key, spec in COMMON_KEYS.items():
        value = raw.get(key, spec.default)
        out[key] = spec.validate(key, list(value) if isinstance(value, tuple) else value)
    if out["device_map"] is not None and not isinstance(out["device_map"], str):
        from oats.placement import map_as_strings

        out["device_map"] = map_as_strings(out["device_map"])  # a ConfigDict holds no dotted keys
    plugins = selected_plugins(out)
    keys = {**plugin_keys(plugins), **mode_keys(plugins), **task_keys(out)}
    unknown = sorted(set(raw) - set(COMMON_KEYS) - set(keys))
    if unknown:
        k = unknown[0]
        if k in VISION_KEYS:
            raise ConfigError(k, f"is a vision key; it applies only when cal_dataset is an image data set (photos, fashion_mnist, imagefolder), not {out['cal_dataset']!r}")
        if k in SELF_GENERATED_KEYS:
            raise ConfigError(k, f"applies only when cal_dataset names 'self_generated' (alone or in a list) or update_dataset is it, not {out['cal_dataset']!r}; remove it")
        if k in MIX_KEYS:
            raise ConfigError(k, f"gives the shares of a mix: it applies only when cal_dataset is a list of sources, not {out['cal_dataset']!r}")
        if k in COMPRESS_KEYS:
            raise ConfigError(k, f"is a compress-mode key; it applies only to methods with a compress mode "
                                 f"({', '.join(sorted(n for n, m in registry.declared('method').items() if m.build_module is not None))}), not {out['method']!r}")
        owners = _owner_of(k)
        if owners:
            raise ConfigError(k, f"belongs to {' and '.join(owners)}, which this experiment does not select "
                                 f"(method {out['method']!r}, layerwise {out['layerwise']!r}, weight_update {out['weight_update']!r}, "
                                 f"block_update {out['block_update']!r}, model_update {out['model_update']!r}); remove it")
        known = all_known_keys()
        near = difflib.get_close_matches(k, known, 1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(k, f"unknown key{hint}; allowed keys: {', '.join(list(COMMON_KEYS) + list(keys))}")
    for key, spec in keys.items():
        value = raw.get(key, spec.default)
        out[key] = spec.validate(key, list(value) if isinstance(value, tuple) else value)
    _check_combinations(out, plugins)
    nm_sparsity(raw, out, plugins["method"])
    for p in plugins.values():
        if p.validate is not None:
            p.validate(out)
    if out["name"] is None:
        out["name"] = default_name(out, plugins["method"].compresses)
    if not NAME_PATTERN.match(out["name"]) or out["name"] in (".", ".."):
        raise ConfigError("name", f"got {out['name']!r}; use letters, digits and . _ + = - only, not starting with '.' (it names a directory)")
    return ml_collections.ConfigDict(out)


def _check_combinations(out: dict[str, Any], plugins: Mapping[str, Any]) -> None:
    """What the selected plugins say they combine with (the framework names no plugin)."""
    method = plugins["method"]
    if not out["model"]:
        raise ConfigError("model", f"missing; give {' or '.join(EMBEDDED_MODELS)}, a local model directory or a hub id")
    if not out["eval_datasets"] and not out["zero_shot_tasks"] and not out["word_perplexity"]:
        raise ConfigError("eval_datasets", "is empty and neither zero_shot_tasks nor word_perplexity is set: the experiment "
                                           "would record no metric; name a data set (e.g. ['pydoc']) or a task")
    _check_placement(out)
    _check_calibration(out)
    if out["export_format"] and not out["save_model"]:
        raise ConfigError("export_format", f"{out['export_format']!r} exports the saved model: set save_model True too")
    if not method.compresses:
        for key in ("sparsity_type", "layerwise", "weight_update", "block_update", "model_update", "targets", "ignore"):
            if out[key] != _default(key):
                raise ConfigError(key, f"got {out[key]!r}, but method {method.name!r} compresses nothing; leave it at {_default(key)!r}")
    if "layerwise" in plugins and not method.supports_layerwise:
        raise ConfigError("layerwise", f"{out['layerwise']!r} does not apply to method {method.name!r}")
    for kind in ("weight_update", "block_update"):
        if kind in plugins and not method.produces_mask:
            raise ConfigError(kind, f"{out[kind]!r} needs a method whose answer has a mask; {method.name!r} has none")
    if "model_update" in plugins:
        _check_model_update(out, plugins["model_update"], method)
    elif out["update_dataset"] is not None:
        raise ConfigError("update_dataset", f"{out['update_dataset']!r} gives a model update's text, and model_update is "
                                            f"{out['model_update']!r}; select a model_update or remove it")


def _check_model_update(out: dict[str, Any], update: Any, method: Any) -> None:
    """A model update trains the whole compressed text model in memory against the dense model's logits."""
    if update.needs_lowrank and not method.lowrank:
        lowrank = sorted(n for n, m in registry.declared("method").items() if m.lowrank)
        raise ConfigError("model_update", f"{out['model_update']!r} trains the low-rank factors, and method {method.name!r} has none; "
                                          f"use a sparse + low-rank method ({', '.join(lowrank)}) or model_update 'none'")
    if method.build_module is None and not update.trains_sparse:
        raise ConfigError("model_update", f"{out['model_update']!r} needs a method with a factored layer (build_module); {method.name!r} has none")
    if out["lazy_load"]:
        raise ConfigError("model_update", f"{out['model_update']!r} trains the whole model end to end, which lazy_load never holds in memory; "
                                          "set lazy_load False or model_update 'none'")
    if is_vision_config(out):
        raise ConfigError("model_update", f"{out['model_update']!r} distils next-token distributions, and {out['cal_dataset']!r} makes a vision "
                                          "experiment; use model_update 'none'")


def _check_calibration(out: dict[str, Any]) -> None:
    """A mix's shares match its list and give every source a window; self-generated text needs the model in memory."""
    if not isinstance(out["cal_dataset"], str):
        names, shares = out["cal_dataset"], out["cal_mix"]
        if shares is not None and len(shares) != len(names):
            raise ConfigError("cal_mix", f"got {len(shares)} shares {shares!r} for the {len(names)} sources {names!r}; give one share per source, in the same order")
        empty = [n for n, k in cal_sources(out) if k == 0]
        if empty:
            raise ConfigError("cal_mix", f"gives {empty} none of the cal_nsamples={out['cal_nsamples']} windows; raise cal_nsamples or their shares")
    if uses_self_generated(out) and out["lazy_load"]:
        raise ConfigError(self_generated_key(out), "'self_generated' samples text from the whole dense model in memory, which lazy_load never holds; "
                                         "set lazy_load False or calibrate on a corpus")


def _check_placement(out: dict[str, Any]) -> None:
    """``max_memory`` and ``offload_dir`` need ``device_map``; no GPU is named with ``device: cpu``;
    vision models are not placed."""
    from oats.placement import named_devices

    for key in ("max_memory", "offload_dir"):
        if out[key] is not None and out["device_map"] is None:
            raise ConfigError(key, "applies only with device_map (the evaluation placed across devices); set device_map, e.g. 'auto', or remove it")
    if out["device_map"] is None:
        return
    if is_vision_config(out):
        raise ConfigError("device_map", "is not supported for vision models (they fit on one device); remove it")
    if out["device"] == "cpu":
        for key, devices in named_devices(out).items():
            gpus = [d for d in devices if d.startswith("cuda")]
            if gpus:
                only = "'cpu' and 'disk'" if key == "device_map" else "'cpu'"
                raise ConfigError(key, f"names {gpus}, but device is 'cpu'; set device 'auto' or 'cuda', or use only {only}")


def _default(key: str) -> Any:
    d = COMMON_KEYS[key].default
    return list(d) if isinstance(d, tuple) else d


def nm_sparsity(raw: Mapping[str, Any], out: dict[str, Any], method: Any) -> None:
    """With N:M, a pure-sparse method removes exactly 1 - N/M whatever ``sparsity`` says: left out, the
    sparsity becomes that value (so the record's target is what is met); given otherwise, an error.
    Sparse + low-rank methods (``Method.lowrank``) spend the rest of the ``sparsity`` budget as rank."""
    nm = parse_nm(out["sparsity_type"])
    if nm is None or method.lowrank or not method.compresses:
        return
    implied = 1 - nm[0] / nm[1]
    if "sparsity" not in raw:
        out["sparsity"] = implied
    elif abs(float(out["sparsity"]) - implied) > 1e-12:
        raise ConfigError("sparsity", f"got {out['sparsity']!r}, but sparsity_type {out['sparsity_type']!r} removes exactly "
                                      f"1 - {nm[0]}/{nm[1]} = {implied:g} of every layer; set sparsity {implied:g} or leave it out")


def resolve_all(cfgs: Sequence[Any]) -> list[ml_collections.ConfigDict]:
    """Resolve a whole experiment list; names must be unique."""
    if not isinstance(cfgs, (list, tuple)):
        raise ConfigError("CONFIGS", f"must be a list of ConfigDicts, got {type(cfgs).__name__}")
    if not cfgs:
        raise ConfigError("CONFIGS", "is empty: there is no experiment to run")
    resolved = [resolve(c, i) for i, c in enumerate(cfgs)]
    seen: dict[str, int] = {}
    for i, c in enumerate(resolved):
        if c.name in seen:
            raise ConfigError("name", f"{c.name!r} is used by experiments #{seen[c.name]} and #{i}; names must be unique")
        seen[c.name] = i
    return resolved


def result_keys(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """The keys of a resolved config that can change its result (common + selected plugins'), less the
    keys declared ``hash_default=False`` that hold their default."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    specs = selected_keys(d)

    def hashed(k: str, v: Any) -> bool:
        spec = specs.get(k)
        if spec is None:
            return True
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        return spec.result and (spec.hash_default or v != default)

    return {k: v for k, v in d.items() if hashed(k, v)}


def experiment_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`result_keys` of a recorded config, the keys that say which experiment it is; a record of a
    method or plugin this code does not register keeps every key."""
    try:
        return result_keys(config)
    except KeyError:
        return dict(config)


def selected_keys(cfg: Mapping[str, Any]) -> dict[str, Key]:
    """Every key a resolved config may hold: the common keys, the selected plugins', compress mode's and the task's."""
    plugins = selected_plugins(cfg)
    return {**COMMON_KEYS, **plugin_keys(plugins), **mode_keys(plugins), **task_keys(cfg)}


def config_hash(cfg: ml_collections.ConfigDict) -> str:
    """Stable 16-hex-digit hash of everything that can change an experiment's result."""
    blob = json.dumps({"hash_version": HASH_VERSION, **result_keys(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def legacy_config_hash(cfg: ml_collections.ConfigDict) -> str | None:
    """The hash the code before plugin-owned keys gave this experiment, or None when that code could
    not have run it (a key it did not have is set away from its default)."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    specs = selected_keys(d)
    d["update"] = d.pop("weight_update")
    for k in [k for k in d if k not in LEGACY_DEFAULTS]:
        # a key added since: the old code behaved as its default does; any other value it could not have run
        spec = specs.get(k)
        default = list(spec.default) if spec is not None and isinstance(spec.default, tuple) else getattr(spec, "default", None)
        if spec is None or (spec.result and d[k] != default):
            return None
    old = {k: d.get(k, v) for k, v in LEGACY_DEFAULTS.items() if k not in _LEGACY_NON_RESULT}
    blob = json.dumps(old, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def keys_markdown() -> str:
    """The config keys page (docs/config-keys.md): every key once, with its default, owners and doc line."""
    lines = ["# Config keys", "",
             "Generated from the key tables by `oats.config.keys_markdown()` (a test fails when this page and the code differ);",
             "regenerate with `python -c \"import oats.config as c; print(c.keys_markdown(), end='')\" > docs/config-keys.md`.",
             "An experiment accepts the common keys plus the keys of what it selects: its method, `layerwise`, `weight_update`,",
             "`block_update` and `model_update` plugins, compress mode (methods with a compress mode), the vision keys (image data sets),",
             "the self_generated keys (`cal_dataset` names `self_generated`, or `update_dataset` is it) and the calibration mix (`cal_dataset` is a list).",
             "Keys marked *not hashed* change how a run goes, never what it computes. Back to the [README](../README.md).", "",
             "| key | default | owners | meaning |", "|---|---|---|---|"]
    for k, (spec, owners) in key_owners().items():
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        note = "" if spec.result else " *(not hashed)*"
        note = note if spec.hash_default else " *(hashed only when set away from its default)*"
        doc = spec.doc.replace("|", "\\|")
        lines.append(f"| `{k}` | `{default!r}` | {', '.join(owners)} | {doc}{note} |")
    return "\n".join(lines) + "\n"


def over_seeds(cfgs: Sequence[Any], seeds: Sequence[int]) -> list[ml_collections.ConfigDict]:
    """Each experiment repeated over calibration ``seeds``, named ``<name>-s<seed>`` (the report merges
    records that differ only by seed into mean ± std). Use in a config file:
    ``CONFIGS = over_seeds([ConfigDict(...), ...], seeds=(0, 1, 2))``."""
    out = []
    for c in cfgs:
        d = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
        if not d.get("name"):
            raise ConfigError("name", "over_seeds needs every experiment named (the seed is appended to the name)")
        out += [ml_collections.ConfigDict({**d, "seed": int(s), "name": f"{d['name']}-s{int(s)}"}) for s in seeds]
    return out

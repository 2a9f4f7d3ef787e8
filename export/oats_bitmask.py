"""Standalone reader of the OATS bitmask checkpoint format (copied next to every exported checkpoint).

This file needs only torch, numpy, safetensors and transformers: it does not import the OATS project.
Load an exported directory with stock transformers::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

(``config.json`` maps ``AutoModelForCausalLM`` to :class:`OatsBitmaskForCausalLM` in this file, which
decodes the weights and returns the ordinary transformers model, e.g. ``LlamaForCausalLM``, with dense
weights), or without the auto classes: ``import oats_bitmask; oats_bitmask.load(directory)``.

Format (file ``oats_bitmask.safetensors``; safetensors metadata key ``oats_bitmask`` holds a JSON
object ``{tensor name: spec}`` for every encoded tensor; tensors not in it are stored as they are):

* ``{"format": "bitmask", "shape": [rows, cols], "dtype": "bfloat16"}``: tensors ``NAME.bitmask_values``
  (the nonzeros in row-major order, the tensor's dtype) and ``NAME.bitmask`` (uint8, one bit per entry,
  row-major, ``numpy.packbits(..., bitorder="little")`` of the flattened 0/1 mask: entry ``k`` is bit
  ``k % 8`` of byte ``k // 8``; the last byte is zero-padded).
* ``{"format": "nm", "n": N, "m": M, "shape": [rows, cols], "dtype": ...}``: every group of M consecutive
  entries of a row holds at most N nonzeros; ``NAME.nm_values`` [rows, cols/M*N] are the N kept values
  of each group in increasing position, ``NAME.nm_indices`` (uint8) their positions inside the group,
  each ``ceil(log2 M)`` bits (little-endian bit order, packed like the bitmask; 2 bits for 2:4).
* ``"lowrank": true`` added to a spec: the weight is ``decoded + NAME.lowrank_U @ NAME.lowrank_V``
  (U [rows, r], V [r, cols]), summed in float32 at load time (OATS sparse + low-rank layers).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

WEIGHTS_NAME = "oats_bitmask.safetensors"
METADATA_KEY = "oats_bitmask"
FORMAT_VERSION = "oats-bitmask-v1"


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = np.unpackbits(packed.contiguous().numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def index_bits(m: int) -> int:
    """Bits per stored in-group index of an N:M layout: ceil(log2 M) (2 for 2:4, 3 for 4:8)."""
    return max(1, math.ceil(math.log2(m)))


def unpack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """Dense [rows, cols] tensor from its nonzeros (row-major) and the packed 1-bit mask."""
    numel = int(np.prod(shape))
    mask = _unpack_bits(bitmask, numel)
    out = torch.zeros(numel, dtype=values.dtype)
    out[mask] = values.reshape(-1)
    return out.reshape(*shape)


def unpack_nm(values: torch.Tensor, indices: torch.Tensor, shape, n: int, m: int) -> torch.Tensor:
    """Dense [rows, cols] tensor from an N:M layout (kept values [rows, cols/M*N] and packed indices)."""
    rows, cols = shape
    groups = cols // m
    b = index_bits(m)
    count = rows * groups * n
    bits = _unpack_bits(indices, count * b).reshape(count, b).to(torch.int64)
    idx = (bits << torch.arange(b, dtype=torch.int64)).sum(1).reshape(rows, groups, n)
    out = torch.zeros(rows, groups, m, dtype=values.dtype)
    out.scatter_(2, idx, values.reshape(rows, groups, n))
    return out.reshape(rows, cols)


def decode_state_dict(tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The plain state dict of an encoded one (``specs`` from the file's metadata)."""
    out = {}
    used = set()
    for name, spec in specs.items():
        shape = spec["shape"]
        if spec["format"] == "bitmask":
            keys = (f"{name}.bitmask_values", f"{name}.bitmask")
            w = unpack_bitmask(tensors[keys[0]], tensors[keys[1]], shape)
        elif spec["format"] == "nm":
            keys = (f"{name}.nm_values", f"{name}.nm_indices")
            w = unpack_nm(tensors[keys[0]], tensors[keys[1]], shape, spec["n"], spec["m"])
        elif spec["format"] == "dense":
            keys = (name,)
            w = tensors[name]
        else:
            raise ValueError(f"{name}: unknown format {spec['format']!r} (this reader knows {FORMAT_VERSION})")
        used.update(keys)
        if spec.get("lowrank"):
            U, V = tensors[f"{name}.lowrank_U"], tensors[f"{name}.lowrank_V"]
            used.update((f"{name}.lowrank_U", f"{name}.lowrank_V"))
            w = (w.float() + U.float() @ V.float()).to(w.dtype)
        out[name] = w
    for k, v in tensors.items():
        if k not in used:
            out[k] = v
    return out


def read_state_dict(directory) -> dict[str, torch.Tensor]:
    """Decoded (dense) state dict of an exported directory."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    specs = json.loads(meta.get(METADATA_KEY, "{}"))
    return decode_state_dict(tensors, specs)


def load(directory, dtype=None, config=None, **_ignored):
    """The dense transformers model of an exported directory (eval mode, CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if config is None:
        config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "auto_map"):
        del config.auto_map  # the model we build is the plain architecture
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    dtype = dtype if isinstance(dtype, torch.dtype) else (saved or torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = read_state_dict(directory)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{directory}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    gen = directory / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


class OatsBitmaskForCausalLM:
    """What ``config.json``'s ``auto_map`` names: ``from_pretrained`` returns the plain model (see :func:`load`)."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, torch_dtype=None, **kwargs):
        return load(pretrained_model_name_or_path, dtype=dtype if dtype is not None else torch_dtype, config=config)


if __name__ == "__main__":  # python oats_bitmask.py DIR OUT: write a plain dense checkpoint
    import sys

    m = load(sys.argv[1])
    m.save_pretrained(sys.argv[2])

"""Architecture adapters: where a model's blocks live, how the model is called, and which matrices
of a block the methods see.

An ``Architecture`` names

- ``blocks``: dotted paths to the ``ModuleList`` of transformer blocks, tried in order;
- ``fused``: linear layers that hold several logical matrices stacked along their output rows, with
  a function of the model config giving each part's rows (Phi-3's ``qkv_proj`` = q, k, v and
  ``gate_up_proj`` = gate, up; GPT-NeoX's ``query_key_value`` interleaves q, k, v per head). Each part is
  budgeted and compressed as its own matrix and the answers are stacked back into the fused layer;
- ``inputs``: the keyword arguments of one forward call on a batch (``input_ids`` for language models,
  ``pixel_values`` for image transformers);
- ``modality``: ``text`` (calibration windows of tokens, perplexity) or ``vision`` (calibration images,
  ``eval.vision`` metrics); the experiment picks its data and evaluation by it.

``matrices(block, arch, config, targets, ignore)`` lists a block's logical matrices, after the
``targets``/``ignore`` name patterns (fnmatch, matched against ``name``, ``block.name`` and, for a part
of a fused layer, ``name:part``). The adapter knows nothing of methods, files or devices.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

Rows = list[tuple[str, Tensor]]  # (part name, row indices of the fused weight), covering every row once


class ArchitectureError(RuntimeError):
    """The model's structure is not what an adapter expects; the message says what to add."""


def _lm_inputs(batch: Tensor) -> dict[str, Any]:
    return {"input_ids": batch, "use_cache": False}


def _vision_inputs(batch: Tensor) -> dict[str, Any]:
    return {"pixel_values": batch}


def _contiguous(*parts: tuple[str, int]) -> Rows:
    out, start = [], 0
    for name, n in parts:
        out.append((name, torch.arange(start, start + n)))
        start += n
    return out


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _phi3_qkv(c: Any) -> Rows:
    hd = _head_dim(c)
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return _contiguous(("q", c.num_attention_heads * hd), ("k", kv * hd), ("v", kv * hd))


def _phi3_gate_up(c: Any) -> Rows:
    return _contiguous(("gate", c.intermediate_size), ("up", c.intermediate_size))


def _neox_qkv(c: Any) -> Rows:
    # GPT-NeoX views the output as [heads, 3 * head_dim]: head h holds q_h, k_h, v_h in turn.
    hd = c.hidden_size // c.num_attention_heads
    base = torch.arange(c.num_attention_heads)[:, None] * 3 * hd
    offs = torch.arange(hd)[None, :]
    return [(name, (base + j * hd + offs).reshape(-1)) for j, name in enumerate(("q", "k", "v"))]


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: tuple[str, ...]
    fused: dict[str, Callable[[Any], Rows]] = field(default_factory=dict)  # linear name inside a block -> parts
    inputs: Callable[[Tensor], dict[str, Any]] = _lm_inputs
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter is chosen for
    modality: str = "text"  # 'text' | 'vision'


# Image transformers (pre-norm encoder blocks called with the hidden states and a positional attention
# mask, returning a tensor). transformers 5.x keeps ViT/DeiT blocks at `layers`, 4.x at `encoder.layer`;
# DINOv2 (layer scale; SwiGLU variants have separate gate/up/down linears) keeps `encoder.layer`.
_VISION = dict(inputs=_vision_inputs, modality="vision")
VISION_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("vit", ("vit.layers", "vit.encoder.layer", "layers", "encoder.layer"), model_types=("vit",), **_VISION),
    Architecture("deit", ("deit.layers", "deit.encoder.layer", "layers", "encoder.layer"), model_types=("deit",), **_VISION),
    Architecture("dinov2", ("dinov2.encoder.layer", "encoder.layer"), model_types=("dinov2",), **_VISION),
    Architecture("dinov2_with_registers", ("dinov2_with_registers.encoder.layer", "encoder.layer"),
                 model_types=("dinov2_with_registers",), **_VISION),
)
VISION_MODEL_TYPES: tuple[str, ...] = tuple(t for a in VISION_ARCHITECTURES for t in a.model_types)

# Decoder-only language models. The generic entry (no model_types) serves any model whose blocks sit
# at one of its paths and whose linears are all separate matrices (Llama, Mistral, Qwen2, Gemma, OPT...).
ARCHITECTURES: tuple[Architecture, ...] = (
    *VISION_ARCHITECTURES,
    Architecture("phi3", ("model.layers",), {"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _phi3_gate_up}, model_types=("phi3",)),
    Architecture("gpt_neox", ("gpt_neox.layers",), {"attention.query_key_value": _neox_qkv}, model_types=("gpt_neox",)),
    Architecture("decoder", ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")),
)


def architecture_of(model: nn.Module) -> Architecture:
    """The adapter for ``model``: the one registered for its config's model_type, else the generic one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return ARCHITECTURES[-1]


def blocks_path(model: nn.Module, arch: Architecture | None = None) -> str:
    arch = arch or architecture_of(model)
    for path in arch.blocks:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return path
    raise ArchitectureError(f"{type(model).__name__}: no ModuleList of blocks at any of {arch.blocks}; "
                            f"add an Architecture to oats.architectures.ARCHITECTURES")


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return model.get_submodule(blocks_path(model))


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by qualified name (in module order)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class Matrix:
    """One logical matrix of a block: ``name`` (``q_proj``, or ``qkv_proj:q`` for a part of a fused
    layer), the linear module holding it and, for a part, its rows of that module's weight."""

    name: str
    linear: str
    rows: Tensor | None = None

    def weight(self, layer: nn.Linear) -> Tensor:
        w = layer.weight.data
        return w if self.rows is None else w[self.rows.to(w.device)]


def _selected(names: Sequence[str], targets: Sequence[str] | None, ignore: Sequence[str]) -> bool:
    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    return (targets is None or hit(targets)) and not hit(ignore)


def matrices(block_index: int, block: nn.Module, arch: Architecture, config: Any,
             targets: Sequence[str] | None = None, ignore: Sequence[str] = ()) -> list[Matrix]:
    """The logical matrices of a block the methods compress, in module order (parts of a fused
    layer in their row order). A fused layer is compressed whole or not at all: its parts are listed
    only if every part is selected, so written-back layers are never half compressed."""
    out: list[Matrix] = []
    for name in linear_layers(block):
        parts = arch.fused[name](config) if name in arch.fused else None
        if parts is None:
            if _selected([name, f"{block_index}.{name}"], targets, ignore):
                out.append(Matrix(name, name))
            continue
        chosen = [Matrix(f"{name}:{p}", name, rows) for p, rows in parts
                  if _selected([name, f"{name}:{p}", f"{block_index}.{name}", f"{block_index}.{name}:{p}"], targets, ignore)]
        if len(chosen) == len(parts):
            out.extend(chosen)
        elif chosen:
            raise ArchitectureError(f"block {block_index}: targets/ignore select only parts {[m.name for m in chosen]} of the fused layer "
                                    f"{name!r}; select all of its parts {[p for p, _ in parts]} or none")
    return out


def check_fused_rows(layer: nn.Linear, parts: Rows, name: str) -> None:
    """Every row of the fused weight belongs to exactly one part (catches a wrong config reading)."""
    rows = torch.cat([r for _, r in parts])
    if rows.numel() != layer.out_features or not torch.equal(rows.sort().values, torch.arange(layer.out_features)):
        raise ArchitectureError(f"{name}: the parts' rows {[(p, r.numel()) for p, r in parts]} do not cover its "
                                f"{layer.out_features} output rows exactly once")


def fused_order(parts: Sequence[Matrix]) -> Tensor | None:
    """For a fused layer's parts stacked in order, the index that puts the stacked rows back in the
    layer's own row order (``fused = stacked[index]``); None when the stacking already is that order."""
    if len(parts) < 2 and (not parts or parts[0].rows is None):
        return None
    perm = torch.cat([m.rows for m in parts])
    if torch.equal(perm, torch.arange(perm.numel())):
        return None
    return torch.argsort(perm)

"""Export a (compressed) model into files people can use without this project.

Formats (``export_model(model, out_dir, format=...)``):

* ``"dense"``: ``save_pretrained`` of the dense model (``S + U V`` summed for OATS layers); stock
  ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it. Not smaller.
* ``"bitmask"``: every weight in its smallest exact layout (bitmask, N:M or dense; OATS layers as the
  bitmask of S plus U, V, summed at load; a layer's bitmask is its own values and mask, cut or repacked to
  this format's padding, :func:`layer_bitmasks`) in ``oats_bitmask.safetensors``, with the standalone reader
  ``oats_bitmask.py`` beside it; stock ``AutoModelForCausalLM.from_pretrained(out_dir,
  trust_remote_code=True)`` (or ``oats_bitmask.load(out_dir)``) returns the plain dense model.
* ``"peft"`` (OATS models): ``out_dir/base`` holds S (``base_format="bitmask"`` as above, or
  ``"dense"``: a stock checkpoint with the zeros written out) and ``out_dir/adapter`` the low-rank part
  as a LoRA adapter: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, ...), adapter)``.
* ``"compressed-tensors"``: not available, see :data:`COMPRESSED_TENSORS_NOTE`.

Every export writes ``oats_export.json`` (:func:`size_report`: bytes per layer and per model against the
dense checkpoint in the same dtype).
"""
from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export.formats import element_size, safetensors_tensor_bytes, write_encoded
from export.oats_bitmask import METADATA_KEY, WEIGHTS_NAME
from export.peft_adapter import write_lora_adapter

FORMATS = ("dense", "bitmask", "peft")
REPORT_NAME = "oats_export.json"
LOADER_FILE = Path(__file__).with_name("oats_bitmask.py")
COMPRESSED_TENSORS_NOTE = (
    "format 'compressed-tensors' (sparse-bitmask) is not offered: transformers 5.23.0's compressed-tensors "
    "integration reads only the quantization part of quantization_config (no sparsity_config, no decompression "
    "of bitmask tensors on load), and compressed-tensors 0.20.1 itself writes 'sparsity_config: {}' ('sparsity is "
    "removed for now'); a sparse-bitmask checkpoint would load as missing weights. Use format='bitmask' "
    "(same idea: values + 1-bit mask, with its own 40-line reader loaded by trust_remote_code=True)."
)


def _slr_layers(model: nn.Module) -> dict[str, nn.Module]:
    from factored.module import compressed_layers

    return compressed_layers(model)


def _sparse_dense(layer) -> Tensor:
    return layer.sparse_dense()


def plain_state_dict(model: nn.Module, merge: bool) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """(state dict with ``NAME.weight`` for every SparseLowRankLinear, {NAME.weight: (U, V)}).

    ``merge``: the weight is ``S + U V`` (summed in float32) and the factors dict is empty; else the
    weight is S. Tensors sharing storage (tied embeddings) appear once, under their first name."""
    layers = _slr_layers(model)
    skip = tuple(f"{n}." for n in layers)
    state: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for k, v in model.state_dict().items():
        if k.startswith(skip):
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        state[k] = v.detach()
    factors = {}
    with torch.no_grad():
        for n, m in layers.items():
            S = _sparse_dense(m)
            if merge:
                w = (S.float() + m.U.float() @ m.V.float()).to(S.dtype) if m.rank else S
            else:
                w = S
                if m.rank:
                    factors[f"{n}.weight"] = (m.U.detach(), m.V.detach())
            state[f"{n}.weight"] = w
            if m.bias is not None:
                state[f"{n}.bias"] = m.bias.detach()
    return state, factors


@contextmanager
def _as_linear(model: nn.Module, merge: bool):
    """Temporarily replace every SparseLowRankLinear by an nn.Linear (weight S + UV, or S)."""
    from factored.module import set_module

    layers = _slr_layers(model)
    try:
        with torch.no_grad():
            for n, m in layers.items():
                S = _sparse_dense(m)
                w = (S.float() + m.U.float() @ m.V.float()).to(S.dtype) if (merge and m.rank) else S
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=w.dtype, device=w.device)
                lin.weight.copy_(w)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                set_module(model, n, lin)
        yield model
    finally:
        for n, m in layers.items():
            set_module(model, n, m)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _save_config(model: nn.Module, directory: Path, auto_map: bool) -> None:
    cfg = copy.deepcopy(model.config)
    cfg.dtype = _model_dtype(model)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if auto_map:
        cfg.auto_map = {"AutoModelForCausalLM": "oats_bitmask.OatsBitmaskForCausalLM"}
    cfg.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(directory)
        except Exception:  # an invalid generation config must not block the export
            pass


def layer_bitmasks(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """{NAME.weight: (values, packed mask)} of every SparseLowRankLinear, taken from its own tensors
    (:func:`export.formats.bitmask_from_layer`; a layer holding an exactly zero value is left out)."""
    from export.formats import bitmask_from_layer

    out = {}
    for n, m in _slr_layers(model).items():
        packed = bitmask_from_layer(m.values, m.mask, (m.out_features, m.in_features))
        if packed is not None:
            out[f"{n}.weight"] = packed
    return out


def _write_bitmask(model: nn.Module, directory: Path, merge_lowrank_into_file: bool, nm) -> dict:
    state, factors = plain_state_dict(model, merge=False)
    specs = write_encoded(state, directory, lowrank=factors if merge_lowrank_into_file else None, nm=nm,
                          bitmasks=layer_bitmasks(model))
    _save_config(model, directory, auto_map=True)
    shutil.copy(LOADER_FILE, directory / LOADER_FILE.name)
    (directory / "README.md").write_text(
        "# OATS bitmask checkpoint\n\nSparse weights are stored as values + a 1-bit mask (or N:M values + indices); "
        "see `oats_bitmask.py` for the format. Load with stock transformers:\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained('{directory.name}', trust_remote_code=True)  # dense weights\n```\n")
    return specs


def export_model(model: nn.Module, out_dir: str | Path, format: str = "bitmask", tokenizer: Any = None,
                 nm: Any = "auto", base_format: str = "bitmask") -> dict:
    """Write ``model`` into ``out_dir`` in ``format`` (see the module docstring); returns :func:`size_report`.

    ``nm``: N:M layouts to try ("auto", None, or (N, M)); ``base_format``: for "peft", how the base
    (S) is stored, "bitmask" (small; loading needs ``trust_remote_code=True``) or "dense" (stock)."""
    if format == "compressed-tensors":
        raise ValueError(COMPRESSED_TENSORS_NOTE)
    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_was_training = model.training
    model.eval()
    info: dict[str, Any] = {"format": format}
    if format == "dense":
        with _as_linear(model, merge=True):
            model.save_pretrained(out_dir)
        dirs = [out_dir]
    elif format == "bitmask":
        _write_bitmask(model, out_dir, merge_lowrank_into_file=True, nm=nm)
        dirs = [out_dir]
    else:
        layers = _slr_layers(model)
        if not any(m.rank for m in layers.values()):
            raise ValueError("format 'peft' needs SparseLowRankLinear layers with rank > 0 (an OATS model in compress mode); "
                             "use 'bitmask' for a sparse-only model")
        base = out_dir / "base"
        if base_format == "bitmask":
            _write_bitmask(model, base, merge_lowrank_into_file=False, nm=nm)
        elif base_format == "dense":
            with _as_linear(model, merge=False):
                model.save_pretrained(base)
        else:
            raise ValueError(f"base_format {base_format!r}: 'bitmask' or 'dense'")
        write_lora_adapter({n: (m.U, m.V) for n, m in layers.items()}, out_dir / "adapter", base_model_name_or_path=str(base))
        info["base_format"] = base_format
        dirs = [base, out_dir / "adapter"]
    if tokenizer is not None:
        tokenizer.save_pretrained(dirs[0])
    model.train(model_was_training)
    report = size_report(out_dir)
    report.update(info)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return report


def export_from_dir(saved_model_dir: str | Path, out_dir: str | Path, format: str = "bitmask", **kwargs) -> dict:
    """Export a model saved by ``factored.module.save_compressed`` (or any plain checkpoint directory);
    its tokenizer files, when present, are written with it."""
    from factored.module import load_compressed

    if format not in FORMATS:
        export_model(None, out_dir, format)  # raises the format error before loading anything
    model = load_compressed(saved_model_dir)
    tok = None
    try:
        from transformers import AutoTokenizer

        if any(Path(saved_model_dir).glob("tokenizer*")):
            tok = AutoTokenizer.from_pretrained(saved_model_dir)
    except Exception:
        tok = None
    return export_model(model, out_dir, format=format, tokenizer=tok, **kwargs)


_SUFFIXES = (".bitmask_values", ".bitmask", ".nm_values", ".nm_indices", ".lowrank_U", ".lowrank_V")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _weight_name(tensor: str) -> str:
    if tensor.startswith("base_model.model.") and (".lora_A." in tensor or ".lora_B." in tensor):
        return tensor.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
    for s in _SUFFIXES:
        if tensor.endswith(s):
            return tensor[: -len(s)]
    return tensor


def size_report(out_dir: str | Path) -> dict:
    """Bytes on disk of an export, per weight and per model, against the dense checkpoint in the same dtype.

    Returns (JSON-serialisable) ``{"layers": {weight: {"format", "shape", "dtype", "density", "rank",
    "bytes", "dense_bytes", "ratio"}}, "total": {"tensor_bytes", "dense_bytes", "ratio", "file_bytes",
    "header_bytes", "files"}}``. ``bytes`` are the tensors' data (from the safetensors headers);
    ``dense_bytes`` the same weight stored dense in its dtype; ``file_bytes`` everything under out_dir
    (headers, configs, the reader) except the report itself. Tied weights count once, as in save_pretrained."""
    out_dir = Path(out_dir)
    layers: dict[str, dict] = {}
    header_total = 0
    for f in sorted(out_dir.rglob("*.safetensors")):
        tensors, header = safetensors_tensor_bytes(f)
        header_total += header
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as sf:
            specs = json.loads((sf.metadata() or {}).get(METADATA_KEY, "{}"))
        for t, h in tensors.items():
            w = _weight_name(t)
            e = layers.setdefault(w, {"format": "dense", "shape": None, "dtype": None, "bytes": 0, "dense_bytes": 0, "rank": 0})
            e["bytes"] += h["bytes"]
            if w in specs:  # encoded weight (bitmask/nm), maybe with U, V beside it
                spec = specs[w]
                e.update(format=spec["format"] if spec["format"] != "dense" else "dense", shape=spec["shape"], dtype=spec["dtype"])
                if spec["format"] == "bitmask" and t.endswith(".bitmask_values"):
                    e["nnz"] = h["shape"][0]
                if spec["format"] == "nm":
                    e["nm"] = f"{spec['n']}:{spec['m']}"
                if t.endswith(".lowrank_U"):
                    e["rank"] = h["shape"][1]
            elif ".lora_" in t:
                if ".lora_A." in t:
                    e["rank"] = h["shape"][0]
            else:  # a plain tensor
                e.update(shape=h["shape"], dtype=h["dtype"])
                e["nnz_unknown"] = True
    total_bytes = dense_total = 0
    for w, e in layers.items():
        shape = e["shape"]
        numel = 1
        for s in shape:
            numel *= s
        dt = e["dtype"]
        eb = _DTYPE_BYTES.get(dt) if dt in _DTYPE_BYTES else element_size(getattr(torch, dt))
        e["dense_bytes"] = numel * eb
        e["ratio"] = e["bytes"] / e["dense_bytes"] if e["dense_bytes"] else None
        if "nnz" in e:
            e["density"] = e["nnz"] / numel if numel else None
        e.pop("nnz_unknown", None)
        total_bytes += e["bytes"]
        dense_total += e["dense_bytes"]
    files = [p for p in out_dir.rglob("*") if p.is_file() and p.name != REPORT_NAME]
    file_bytes = sum(p.stat().st_size for p in files)
    encoded = {w: e for w, e in layers.items() if e["format"] != "dense" or e["rank"]}
    return {"layers": encoded,
            "total": {"tensor_bytes": total_bytes, "dense_bytes": dense_total,
                      "ratio": total_bytes / dense_total if dense_total else None, "file_bytes": file_bytes,
                      "header_bytes": header_total, "files": len(files),
                      "n_tensors": len(layers), "n_encoded": len(encoded)}}

"""Storage layouts that are really smaller than dense: bitmask, N:M, and their byte counts.

Pure functions, exact round trips (``unpack(pack(W)) == W`` bit for bit, any dtype):

* bitmask: the nonzeros (row-major) plus one bit per entry -> ``nnz * e + ceil(rows*cols / 8)`` bytes
  for an element size ``e``; at 50% in bfloat16 that is 1.125 of 2 bytes per entry (0.5625x dense).
* N:M: N kept values per group of M plus ``ceil(log2 M)``-bit in-group indices ->
  ``rows*cols/M*N * e + ceil(rows*cols/M*N*b / 8)`` bytes (2:4: 2 bits per kept value, 1 bit per entry).
* low-rank factors are stored as they are (``r (rows + cols) e`` bytes).

The decoders live in :mod:`export.oats_bitmask`, the standalone file copied next to every export.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.oats_bitmask import METADATA_KEY, WEIGHTS_NAME, index_bits, unpack_bitmask, unpack_nm  # noqa: F401 (unpack_*: re-exported)

# N:M layouts tried when a weight is encoded with ``nm="auto"`` (N kept of every M inputs).
NM_CANDIDATES = ((2, 4), (4, 8), (1, 4), (2, 8), (1, 2))


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pack_bits(bits: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).to(torch.bool).numpy(), bitorder="little"))


def pack_bitmask(w: Tensor) -> tuple[Tensor, Tensor]:
    """(values [nnz] in row-major order, packed mask uint8 [ceil(numel/8)]) of a 2-D tensor."""
    w = w.detach().cpu().contiguous()
    mask = w != 0
    return w[mask].clone(), _pack_bits(mask)


def bitmask_from_layer(values: Tensor, mask: Tensor, shape) -> tuple[Tensor, Tensor] | None:
    """:func:`pack_bitmask`'s output taken from a ``SparseLowRankLinear``'s own tensors (values [nnz] and
    the row mask of :mod:`factored.bitmask`) instead of from a dense S: the same tensors, byte for byte.

    The layer pads each mask row to 32-bit words; this format packs the flattened matrix, padding only the
    last byte. When ``cols % 8 == 0`` the rows are whole bytes, so the layer's rows cut to ``cols / 8``
    bytes are the packed mask (all of it when ``cols % 32 == 0``); otherwise the bits are repacked. None
    when a stored value is exactly zero (:func:`pack_bitmask` would drop it: the caller packs S instead)."""
    rows, cols = shape
    values = values.detach().cpu().contiguous()
    if bool((values == 0).any()):
        return None
    mask = mask.detach().cpu()
    if cols % 8 == 0:
        packed = mask[:, : cols // 8].contiguous().reshape(-1)
    else:
        from factored.bitmask import unpack_mask

        packed = _pack_bits(unpack_mask(mask, cols))
    return values.clone(), packed


def bitmask_bytes(shape, nnz: int, dtype: torch.dtype) -> int:
    """Bytes of the bitmask layout: values + packed mask."""
    return nnz * element_size(dtype) + math.ceil(int(np.prod(shape)) / 8)


def is_nm(w: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of each row holds at most ``n`` nonzeros."""
    if w.dim() != 2 or w.shape[1] % m:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


def pack_nm(w: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(values [rows, cols/M*N], packed indices uint8) of a weight that is N:M (see :func:`is_nm`).

    Each group keeps its nonzeros, then (when it has fewer than N) the first zero positions, in
    increasing position order, so the decoded tensor equals ``w`` exactly."""
    w = w.detach().cpu().contiguous()
    if not is_nm(w, n, m):
        raise ValueError(f"weight of shape {tuple(w.shape)} is not {n}:{m} sparse")
    rows, cols = w.shape
    g = w.reshape(rows, cols // m, m)
    pos = torch.arange(m)
    score = (g != 0).to(torch.int64) * (2 * m) - pos  # nonzeros first, then earliest positions
    idx = score.topk(n, dim=-1).indices.sort(dim=-1).values
    values = g.gather(2, idx).reshape(rows, -1).clone()
    b = index_bits(m)
    bits = (idx.reshape(-1, 1) >> torch.arange(b)) & 1
    return values, _pack_bits(bits)


def nm_bytes(shape, n: int, m: int, dtype: torch.dtype) -> int:
    """Bytes of the N:M layout: kept values + packed ceil(log2 M)-bit indices."""
    kept = int(np.prod(shape)) // m * n
    return kept * element_size(dtype) + math.ceil(kept * index_bits(m) / 8)


def dense_bytes(shape, dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * element_size(dtype)


def choose_layout(w: Tensor, nm="auto") -> dict:
    """The smallest exact layout of one tensor: ``{"format": "dense"|"bitmask"|"nm", ...,"bytes": b}``.

    ``nm``: "auto" (try :data:`NM_CANDIDATES`), None (never N:M) or one (N, M). Only 2-D floating
    tensors are encoded; ties go to N:M (regular), then to dense."""
    shape = list(w.shape)
    best = {"format": "dense", "shape": shape, "bytes": dense_bytes(shape, w.dtype)}
    if w.dim() != 2 or not w.is_floating_point():
        return best
    nnz = int(torch.count_nonzero(w))
    b = bitmask_bytes(shape, nnz, w.dtype)
    if b < best["bytes"]:
        best = {"format": "bitmask", "shape": shape, "bytes": b}
    cands = NM_CANDIDATES if nm == "auto" else (() if nm is None else (tuple(nm),))
    for n, m in cands:
        b = nm_bytes(shape, n, m, w.dtype)
        if b <= best["bytes"] and is_nm(w, n, m):
            best = {"format": "nm", "n": n, "m": m, "shape": shape, "bytes": b}
    return best


def encode_tensor(name: str, w: Tensor, layout: dict, bitmask: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """The stored tensors of ``w`` under ``layout`` (from :func:`choose_layout`); ``bitmask``: the
    (values, packed mask) of ``w`` already at hand (:func:`bitmask_from_layer`), used for that layout."""
    if layout["format"] == "bitmask":
        v, mk = bitmask if bitmask is not None else pack_bitmask(w)
        return {f"{name}.bitmask_values": v, f"{name}.bitmask": mk}
    if layout["format"] == "nm":
        v, ix = pack_nm(w, layout["n"], layout["m"])
        return {f"{name}.nm_values": v, f"{name}.nm_indices": ix}
    return {name: w.detach().cpu().contiguous()}


def write_encoded(state: dict[str, Tensor], directory: str | Path, lowrank: dict[str, tuple[Tensor, Tensor]] | None = None,
                  nm="auto", filename: str = WEIGHTS_NAME, bitmasks: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, dict]:
    """Write ``state`` (a plain state dict) into ``directory/filename`` with each tensor in its smallest
    layout; ``lowrank`` maps a weight name to (U, V) stored beside it (summed at load); ``bitmasks`` a
    weight name to its (values, packed mask) when already at hand, stored as they are if the bitmask layout
    is chosen. Returns the specs (also in the file's metadata), each with ``bytes`` = the formula's byte
    count of its encoded tensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lowrank = lowrank or {}
    out: dict[str, Tensor] = {}
    specs: dict[str, dict] = {}
    for name, w in state.items():
        layout = choose_layout(w, nm)
        out.update(encode_tensor(name, w, layout, (bitmasks or {}).get(name)))
        if name in lowrank:
            U, V = lowrank[name]
            out[f"{name}.lowrank_U"], out[f"{name}.lowrank_V"] = U.detach().cpu().contiguous(), V.detach().cpu().contiguous()
            layout = {**layout, "lowrank": True, "rank": int(U.shape[1]),
                      "bytes": layout["bytes"] + (U.numel() + V.numel()) * element_size(U.dtype)}
        if layout["format"] != "dense" or layout.get("lowrank"):
            specs[name] = {**layout, "dtype": str(w.dtype).removeprefix("torch.")}
    save_file(out, str(directory / filename), metadata={METADATA_KEY: json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "bytes"} for k, v in specs.items()}),
                                                       "format": "pt"})
    return specs


def safetensors_tensor_bytes(path: str | Path) -> tuple[dict[str, dict], int]:
    """({tensor: {"dtype", "shape", "bytes"}}, header bytes incl. the 8-byte length) of a safetensors file,
    read from its header (exact, nothing loaded)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = {k: {"dtype": v["dtype"], "shape": v["shape"], "bytes": v["data_offsets"][1] - v["data_offsets"][0]} for k, v in header.items()}
    return out, 8 + n

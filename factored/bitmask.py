"""The in-memory bitmask layout of a sparse matrix S [out, in]: its nonzeros row-major (``values``
[nnz], any dtype) and one bit per entry, each row padded to 32-bit words (``mask`` uint8
[out, 4 * ceil(in / 32)], bit j of byte c = column 8c + j, padding bits zero). When ``in`` is a multiple
of 32 the mask bytes are exactly the exported bitmask (``export.formats.pack_bitmask``, little bit order).
Pure tensor functions, no kernel needed.
"""
from __future__ import annotations

import torch
from torch import Tensor

_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def mask_bytes(in_features: int) -> int:
    """Bytes of one mask row: ``in_features`` bits padded to 32-bit words."""
    return 4 * ((in_features + 31) // 32)


def pack_mask(keep: Tensor) -> Tensor:
    """keep [out, in] bool -> mask uint8 [out, mask_bytes(in)]."""
    out, inp = keep.shape
    width = mask_bytes(inp) * 8
    bits = torch.zeros(out, width, dtype=torch.uint8, device=keep.device)
    bits[:, :inp] = keep.to(torch.uint8)
    weights = (1 << torch.arange(8, device=keep.device)).to(torch.int32)
    return (bits.view(out, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_mask(mask: Tensor, in_features: int) -> Tensor:
    """mask uint8 [out, mask_bytes(in)] -> keep [out, in] bool."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :in_features].bool()


def pack(w: Tensor) -> tuple[Tensor, Tensor]:
    """Dense w [out, in] -> (values [nnz] of w's dtype, row-major; mask uint8 [out, mask_bytes(in)]); exact zeros dropped."""
    keep = w != 0
    return w[keep].contiguous(), pack_mask(keep)


def row_counts(mask: Tensor) -> Tensor:
    """Nonzeros per row [out] int64."""
    return _POPCOUNT8.to(mask.device)[mask.long()].sum(1)


def two_per_nibble(mask: Tensor, in_features: int) -> Tensor:
    """Per row [out] bool: every 4 columns hold exactly 2 entries (the rows of a 2:4 or 1:2 pattern, unless
    a kept entry is exactly zero, which the layout drops). Such a row's values advance by a fixed stride of
    2 per mask nibble, which the compiled kernel's 2:4 paths rely on. All False when ``in_features % 4``."""
    out = mask.shape[0]
    if in_features % 4 or in_features == 0:
        return torch.zeros(out, dtype=torch.bool, device=mask.device)
    nibbles = torch.stack([mask & 15, mask >> 4], -1).reshape(out, -1)[:, : in_features // 4]
    return (_POPCOUNT8.to(mask.device)[nibbles.long()] == 2).all(1)


def two_four_flags(mask: Tensor, in_features: int) -> Tensor | None:
    """:func:`two_per_nibble` as the compiled kernel takes it: uint8 [out], or None when no row qualifies."""
    rows = two_per_nibble(mask, in_features)
    return rows.to(torch.uint8) if bool(rows.any()) else None


def row_offsets(mask: Tensor) -> Tensor:
    """Where each row's values start in ``values``: int64 [out + 1] (the CSR ``crow_indices``)."""
    counts = row_counts(mask)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def to_dense(values: Tensor, mask: Tensor, in_features: int) -> Tensor:
    """S [out, in] of the values' dtype (differentiable in ``values``)."""
    keep = unpack_mask(mask, in_features)
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def from_csr(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The mask of a CSR pattern (row-sorted column indices, as ``to_sparse_csr`` writes them)."""
    out, inp = shape
    rows = torch.repeat_interleave(torch.arange(out, device=crow_indices.device), crow_indices.to(torch.int64).diff())
    keep = torch.zeros(out, inp, dtype=torch.bool, device=crow_indices.device)
    keep[rows, col_indices.to(torch.int64)] = True
    return pack_mask(keep)


def mask_from_csr(crow_indices: Tensor, col_indices: Tensor, mask_shape: tuple[int, int]) -> Tensor:
    """The mask [out, 4 * words] of a CSR pattern, knowing only the mask's shape (a skeleton's buffer):
    the rows are packed :func:`from_csr` at the padded width, whose padding bits are zero either way."""
    out, nbytes = mask_shape
    return from_csr(crow_indices, col_indices, (out, 8 * nbytes))


def to_csr_indices(mask: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    """(crow_indices int64 [out+1], col_indices int64 [nnz]) of the mask's pattern."""
    keep = unpack_mask(mask, in_features)
    return row_offsets(mask), keep.nonzero()[:, 1]

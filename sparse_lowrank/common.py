"""What the sparse + low-rank methods (``oats``, ``gram_slr``) share: the OATS budget split of a layer's
kept parameters between the sparse part and the rank (``oats_budget``, exact arithmetic, the one
function every caller uses), the record's budget facts (``budget_info``), the ``rank_ratio`` key, the
config checks and the compress-mode module (``build_module``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

from torch import nn

from oats.interface import CompressedWeight
from oats.keys import ConfigError, Key, interval, parse_nm

RANK_RATIO = Key(0.3, (float, int), "sparse + low-rank kappa: share of the kept parameters given to the low-rank part", interval(0.0, 1.0))


class OatsBudgetError(ValueError):
    """The compression rate cannot be met with the requested sparsity pattern."""


def _exact(x: float | int) -> Fraction:
    """A config number as the exact decimal it was written as (0.3 -> 3/10), so floors are exact."""
    return Fraction(repr(float(x))) if not isinstance(x, int) else Fraction(x)


@dataclass(frozen=True)
class OatsBudget:
    """How one [d_out, d_in] layer's kept parameters split between the sparse and low-rank parts.

    rank:          r, columns of U / rows of V.
    keep_per_row:  k, nonzeros of the sparse part in every row.
    nm:            (N, M) when the sparse part is N:M, else None.
    allowed:       floor((1 - rho) d_out d_in), the most parameters the compression rate allows.
    """

    d_out: int
    d_in: int
    compression: float
    rank: int
    keep_per_row: int
    nm: tuple[int, int] | None
    allowed: int

    @property
    def nonzeros(self) -> int:
        return self.d_out * self.keep_per_row

    @property
    def kept_params(self) -> int:
        """Nonzeros of S plus the entries of U [d_out, r] and V [r, d_in]."""
        return self.nonzeros + self.rank * (self.d_out + self.d_in)

    @property
    def achieved_compression(self) -> float:
        """Fraction of the d_out*d_in parameters removed, exactly as kept (never below ``compression``)."""
        return 1.0 - self.kept_params / (self.d_out * self.d_in)

    @property
    def row_sparsity(self) -> float:
        """Fraction of every row of S that is zero."""
        return 1.0 - self.keep_per_row / self.d_in


def oats_budget(d_out: int, d_in: int, compression: float, rank_ratio: float, nm: tuple[int, int] | None = None) -> OatsBudget:
    """Split the parameters a compression rate ``rho`` leaves to one layer.

    Unstructured (paper, Sec. 3): ``r = floor(kappa (1-rho) d_out d_in / (d_out + d_in))`` and
    ``k = floor((1-kappa)(1-rho) d_in)`` kept per row, so ``d_out k + r (d_out + d_in) <= (1-rho) d_out d_in``.

    N:M (``nm=(N, M)``, N kept of every M inputs): the sparse part holds ``d_out d_in N / M`` nonzeros
    and the rank takes the rest, ``r = floor((floor((1-rho) d_out d_in) - d_out d_in N/M) / (d_out + d_in))``;
    ``rank_ratio`` is unused. Raises :class:`OatsBudgetError` when ``1 - rho < N/M`` or M does not divide d_in.
    Numbers are taken as the exact decimals written (0.3 is 3/10), so the floors never drift.
    """
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"layer shape ({d_out}, {d_in}) must be positive")
    rho, kappa = _exact(compression), _exact(rank_ratio)
    if not (0 <= rho < 1):
        raise OatsBudgetError(f"compression rate (config key 'sparsity') {compression!r} must lie in [0, 1)")
    if not (0 <= kappa < 1):
        raise OatsBudgetError(f"rank ratio (config key 'rank_ratio') {rank_ratio!r} must lie in [0, 1)")
    total = d_out * d_in
    allowed = math.floor((1 - rho) * total)
    if nm is None:
        rank = math.floor(kappa * (1 - rho) * Fraction(total, d_out + d_in))
        keep = math.floor((1 - kappa) * (1 - rho) * d_in)
    else:
        n, m = nm
        if not (0 < n < m):
            raise OatsBudgetError(f"N:M {n}:{m} needs 0 < N < M (config key 'sparsity_type')")
        if d_in % m:
            raise OatsBudgetError(f"N:M {n}:{m} needs the input dimension ({d_in}) to be a multiple of M={m} (config key 'sparsity_type')")
        keep = d_in // m * n
        nnz = d_out * keep
        if nnz > allowed:
            raise OatsBudgetError(
                f"compression rate {compression!r} (config key 'sparsity') keeps at most {allowed} of {total} parameters, "
                f"fewer than the {nnz} nonzeros of an {n}:{m} sparse part (config key 'sparsity_type'); "
                f"N:M needs sparsity <= 1 - N/M = {float(1 - Fraction(n, m)):g}"
            )
        rank = (allowed - nnz) // (d_out + d_in)
    rank = min(rank, d_out, d_in)
    return OatsBudget(d_out, d_in, float(compression), rank, keep, nm, allowed)


def keep_per_row_for(d_in: int, row_sparsity: float) -> int:
    """Entries kept per row at a per-row sparsity: ``floor((1 - s) d_in)``, with s as the exact decimal written."""
    return math.floor((1 - _exact(row_sparsity)) * d_in)


def budget_info(b: OatsBudget, nnz: int, target: float) -> dict[str, Any]:
    """The record's facts about a sparse + low-rank answer under an OATS budget (rank, counts, exact compression)."""
    kept = nnz + b.rank * (b.d_out + b.d_in)
    return {
        "rank": b.rank,
        "nonzeros": nnz,
        "keep_per_row": b.keep_per_row,
        "kept_params": kept,
        "achieved_compression": 1.0 - kept / (b.d_out * b.d_in),
        "target_compression": float(target),
        "lowrank_share": b.rank * (b.d_out + b.d_in) / kept if kept else 0.0,
    }


def validate(cfg: Mapping[str, Any]) -> None:
    """Checks every sparse + low-rank method shares: rows threshold per row; an N:M part must fit the rate."""
    if cfg["mask_scope"] not in (None, "row"):
        raise ConfigError("mask_scope", f"got {cfg['mask_scope']!r}; {cfg['method']} thresholds per row: allowed values None, 'row'")
    nm = parse_nm(cfg["sparsity_type"])
    if nm is not None and 1 - Fraction(repr(float(cfg["sparsity"]))) < Fraction(nm[0], nm[1]):
        raise ConfigError("sparsity", f"{cfg['method']} compression rate {cfg['sparsity']!r} keeps fewer parameters than the sparse part "
                          f"of sparsity_type {cfg['sparsity_type']!r} holds ({nm[0]}/{nm[1]} of each layer); with N:M the low-rank "
                          f"part takes the rest of the budget and rank_ratio is unused: allowed sparsity <= 1 - N/M = {1 - nm[0] / nm[1]:g}")


def build_module(cw: CompressedWeight, layer: nn.Linear, cfg: Any) -> nn.Module | None:
    """Compress mode (the framework calls it when ``compress`` is true): the layer becomes a
    ``SparseLowRankLinear`` holding S, U, V; a dense answer is written back as a weight (None)."""
    if not cw.is_factored:
        return None
    from factored.module import SparseLowRankLinear

    return SparseLowRankLinear.from_factors(cw.sparse, cw.U, cw.V, layer.bias, dtype=layer.weight.dtype)

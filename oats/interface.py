"""The method interface: what the pipeline hands a method and what it gets back.

A method is a pure function of tensors::

    compress_weight(W: [out, in], stats: InputStats, budget: Budget, cfg) -> CompressedWeight

unaware of models, files and devices. The pipeline computes the statistics once per input (layers
reading the same input share them) and writes back whatever the method returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Calibration statistics of one linear layer's input x (n_tokens rows of d_in features).

    sq_norms: [d_in], sum over tokens of x_j^2 (float32/float64). ``sqrt(sq_norms)`` is Wanda's ||X_j||_2.
    gram:     [d_in, d_in], sum over tokens of x^T x, or None when the method asked for the diagonal only.
    n_tokens: number of token rows summed.
    """

    sq_norms: Tensor
    n_tokens: int
    gram: Tensor | None = None

    @property
    def second_moment(self) -> Tensor:
        """[d_in] mean of x_j^2 over tokens: OATS's D."""
        return self.sq_norms / max(self.n_tokens, 1)

    @property
    def col_norms(self) -> Tensor:
        """[d_in] ||X_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.sq_norms.sqrt()


@dataclass(frozen=True)
class Budget:
    """How much of one layer survives.

    sparsity: fraction of the layer's d_out*d_in parameters removed (OATS: the compression rate,
              counting the low-rank factors' entries as kept parameters).
    nm:       (N, M) when N of every M consecutive weights along the input dimension are kept, else None.
    scope:    'row' or 'layer' for unstructured masks (where weights compete); None = method default.
    """

    sparsity: float
    nm: tuple[int, int] | None = None
    scope: str | None = None


@dataclass
class CompressedWeight:
    """A method's answer for one layer: a dense (pruned) weight, or the OATS factors.

    dense:  [out, in] weight to write back, or None when the answer is factored.
    sparse: [out, in] with exact zeros; U: [out, r]; V: [r, in]; weight ~= sparse + U @ V.
    info:   per-layer facts for the result record (rank, nonzeros, errors...), JSON-serialisable.
    mask:   optional [out, in] bool, True = kept, of ``dense`` (or of ``sparse`` when factored). Weight
            updates (OPTIMA) re-solve exactly these entries; when None they take the nonzeros, so a kept
            weight that happens to be exactly 0 is then treated as pruned.
    """

    dense: Tensor | None = None
    sparse: Tensor | None = None
    U: Tensor | None = None
    V: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None

    def to_dense(self) -> Tensor:
        if self.dense is not None:
            return self.dense
        assert self.sparse is not None
        out = self.sparse.clone()
        if self.U is not None and self.V is not None and self.U.shape[1] > 0:
            out += self.U @ self.V
        return out

    @property
    def is_factored(self) -> bool:
        return self.dense is None

    def param_count(self) -> int:
        """Parameters kept: nonzeros of the sparse/dense part plus the low-rank factors' entries."""
        if self.dense is not None:
            return int(torch.count_nonzero(self.dense))
        n = int(torch.count_nonzero(self.sparse))
        if self.U is not None and self.V is not None:
            n += self.U.numel() + self.V.numel()
        return n


class CompressFn(Protocol):
    def __call__(self, weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any) -> CompressedWeight: ...


@dataclass(frozen=True)
class Method:
    """A registered method. ``stats`` says what the pipeline must collect: 'none', 'diag' or 'gram'."""

    name: str
    compress: Callable[..., CompressedWeight]
    stats: str = "diag"
    doc: str = ""
    supports_owl: bool = True
    supports_update: bool = True  # produces a mask that OPTIMA can re-solve

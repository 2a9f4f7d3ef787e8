"""OATS's math (Zhang & Papyan, ICLR 2025, Algorithms 1-2): the budget split and alternating
thresholding of a weight scaled by the square root of its inputs' second moments. Pure tensor
functions: no model, no I/O.

Notation: ``W`` is [d_out, d_in]; ``D`` [d_in] the mean of x_j^2 over calibration tokens; the scaled
weight is ``W_s = W diag(sqrt D)``. Alternating thresholding from ``S = 0``, ``num_iters`` times:

    L <- best rank-r approximation of (W_s - S)
    S <- keep the k largest |W_s - L| of every row (or N of every M along the input dimension)

then ``S diag(1/sqrt D) + L diag(1/sqrt D)`` approximates ``W``. Both steps minimise the scaled
objective ``||W_s - S - L||_F`` exactly over their own block, so it never increases (exact mode).

Low-rank step, two modes (``svd``):

* ``"exact"``: a full thin SVD of ``W_s - S`` every iteration, as the reference code does.
* ``"fast"`` (default): only the top-r subspace is needed. Iteration 0 takes one thin SVD of
  ``W_s``; later iterations run block subspace iteration on ``r + p`` vectors (``p`` oversampling)
  warm-started from the previous iteration's right singular vectors, each step being a
  Rayleigh-Ritz projection (two matmuls, a QR of [d_out, r+p], an SVD of the small
  [r+p, d_in] matrix in float64). Steps repeat until the Ritz residual ``||A v_i - s_i u_i||``
  of the top r pairs is below ``tol`` times the rank-r approximation error (at most ``max_steps``).
  Because ``W_s - S`` changes little between iterations, one or two steps usually suffice. The
  residual criterion ties the subspace error to the objective itself, so the fast loop follows
  the exact loop's trajectory rather than drifting from it (an earlier one-step variant that was
  within 1% per matrix lost 7% perplexity end to end).

Hard thresholding uses ``topk`` (exact count per row) instead of a sort; in fast mode each row first
tries last iteration's cut and falls back to ``topk`` only where that cut does not select exactly k
entries (same selection, see ``_RowThreshold``). N:M is one vectorised ``topk`` over groups. Inputs may carry a leading batch dimension
([B, d_out, d_in] with [B, d_in] moments) so same-shape matrices run together (useful on a GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

# D is floored at EPS_REL * max(D) (and at the smallest normal float32 when D is all zero or
# denormal): unscaling divides by sqrt(D), so an input that never fires (D = 0) must not produce
# 0/0 or overflow. 1e-12 keeps sqrt(D_floor) = 1e-6 sqrt(max D), a normal float32, while moving
# no column whose input carries any measurable energy.
EPS_REL = 1e-12
_TINY = torch.finfo(torch.float32).tiny

SVD_MODES = ("fast", "exact")


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


def safe_second_moment(second_moment: Tensor, eps_rel: float = EPS_REL) -> Tensor:
    """D floored at ``eps_rel * max(D)`` (per matrix along the last dim), and at the smallest normal float32."""
    d = second_moment.clamp(min=0)
    floor = (d.amax(dim=-1, keepdim=True) * eps_rel).clamp(min=_TINY)
    return torch.maximum(d, floor)


def hard_threshold(x: Tensor, keep_per_row: int, nm: tuple[int, int] | None = None) -> Tensor:
    """[..., d_out, d_in] -> x with all but the ``keep_per_row`` largest |x| of every row zeroed
    (or, with ``nm=(N, M)``, all but the N largest of every M consecutive entries of a row).

    Exactly ``keep_per_row`` (N:M: N per group) entries survive in every row, even with ties.
    """
    d_in = x.shape[-1]
    if nm is not None:
        n, m = nm
        groups = x.reshape(*x.shape[:-1], d_in // m, m)
        idx = groups.abs().topk(n, dim=-1, sorted=False).indices
        return torch.zeros_like(groups).scatter_(-1, idx, groups.gather(-1, idx)).reshape(x.shape)
    if keep_per_row >= d_in:
        return x.clone()
    if keep_per_row <= 0:
        return torch.zeros_like(x)
    idx = x.abs().topk(keep_per_row, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def _orth(Y: Tensor) -> Tensor:
    """Orthonormal basis of range(Y) [B, m, l]: Cholesky QR in float64 (one small Gram, one triangular
    solve; much cheaper than Householder QR on a CPU), Householder QR when Y is too ill-conditioned."""
    Yd = Y.double()
    R, info = torch.linalg.cholesky_ex(Yd.mT @ Yd, upper=True)
    if bool((info == 0).all()):
        Q = torch.linalg.solve_triangular(R, Yd, upper=True, left=False)
        if bool(torch.isfinite(Q).all()):
            return Q.to(Y.dtype)
    return torch.linalg.qr(Y).Q


def _ritz(A: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One subspace-iteration step: Rayleigh-Ritz of A [B,m,n] on range(A V), V [B,n,l].

    Returns (Q [B,m,l], Ub [B,l,l], sigma [B,l] descending, Vh [B,l,n]), A ~ Q Ub diag(sigma) Vh, with
    the small l x l eigenproblem of (Q^T A)(Q^T A)^T solved in float64.
    """
    Q = _orth(A @ V)
    Z = (A.mT @ Q).double()  # [B, n, l] = (Q^T A)^T
    lam, Ub = torch.linalg.eigh(Z.mT @ Z)
    lam, Ub = lam.flip(-1).clamp(min=0), Ub.flip(-1)
    sig = lam.sqrt()
    # right Ritz vectors v_i = A^T Q ub_i / s_i; a vanishing s_i leaves an arbitrary (zero) column,
    # harmless: it only seeds the next step's basis, which is re-orthonormalised.
    Vh = ((Z @ Ub) / sig.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-2)).mT
    return Q, Ub.to(A.dtype), sig, Vh.to(A.dtype)


class _LowRank:
    """The low-rank step of alternating thresholding, exact or warm-started subspace iteration."""

    def __init__(self, rank: int, svd: str, oversample: int | None, tol: float, max_steps: int):
        self.r, self.svd, self.tol, self.max_steps = rank, svd, tol, max_steps
        self.oversample = oversample
        self.V: Tensor | None = None  # [B, n, l] warm start (fast mode)
        self.steps: list[int] = []  # subspace-iteration steps per call (fast mode), for the record

    def __call__(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A [B, m, n] -> (U [B,m,r], sigma [B,r], Vh [B,r,n]) in A's dtype: best rank-r approximation factors."""
        r = self.r
        m, n = A.shape[-2:]
        p = self.oversample if self.oversample is not None else max(8, r // 2)
        l = min(r + p, m, n)
        if self.svd == "exact" or l >= min(m, n) or self.V is None:
            U, sig, Vh = torch.linalg.svd(A, full_matrices=False)
            if self.svd == "fast":
                self.V = Vh[..., :l, :].mT.contiguous()
                self.steps.append(0)
            return U[..., :r], sig[..., :r], Vh[..., :r, :]
        V = self.V
        steps = 0
        a2 = A.square().sum((-2, -1), dtype=torch.float64)
        while True:
            Q, Ub, sig, Vh = _ritz(A, V)
            steps += 1
            V = Vh.mT
            Ur = Q @ Ub[..., :r]
            sr = sig[..., :r]
            if steps >= self.max_steps:
                break
            # Ritz residual of the top r pairs, ||A v_i - s_i u_i|| (A^T u_i - s_i v_i is zero by
            # construction), against the rank-r error ||A||^2 - sum s_i^2 that the objective sees.
            res2 = (A @ V[..., :r] - Ur * sr.to(A.dtype).unsqueeze(-2)).square().sum((-2, -1), dtype=torch.float64)
            tail2 = (a2 - sr.square().sum(-1)).clamp(min=0)
            if bool((res2 <= self.tol**2 * tail2).all()):
                break
        self.V = V
        self.steps.append(steps)
        return Ur, sr.to(A.dtype), Vh[..., :r, :]


class _RowThreshold:
    """Hard thresholding to ``k`` per row, warm-started: last iteration's per-row cut (midway between
    the k-th and (k+1)-th largest |x|) is tried first; a row where it does not select exactly k entries
    falls back to ``topk``. Whenever the cut selects exactly k entries, every selected |x| exceeds every
    unselected one, so the result is a top-k set, the same as ``topk``'s up to the order of ties."""

    def __init__(self, k: int):
        self.k = k
        self.cut: Tensor | None = None  # [B, m, 1]

    def __call__(self, x: Tensor) -> Tensor:
        k, d_in = self.k, x.shape[-1]
        if k >= d_in:
            return x.clone()
        if k <= 0:
            return torch.zeros_like(x)
        a = x.abs()
        if self.cut is not None:
            mask = a >= self.cut
            bad = mask.sum(-1) != k  # [B, m]
            if not bool(bad.any()):
                return torch.where(mask, x, 0.0)
            rows = a[bad]  # [n_bad, n]
            vals, idx = rows.topk(k + 1, dim=-1, sorted=True)
            row_mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, idx[:, :k], True)
            mask[bad] = row_mask
            self.cut[bad] = ((vals[:, k - 1] + vals[:, k]) / 2).unsqueeze(-1)
            return torch.where(mask, x, 0.0)
        vals, idx = a.topk(k + 1, dim=-1, sorted=True)
        mask = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx[..., :k], True)
        self.cut = ((vals[..., k - 1] + vals[..., k]) / 2).unsqueeze(-1)
        return torch.where(mask, x, 0.0)


@dataclass
class ThresholdingResult:
    """What :func:`decompose` returns: factors in original coordinates plus facts for the record."""

    sparse: Tensor  # [..., d_out, d_in], exact zeros outside the kept entries
    U: Tensor  # [..., d_out, r]
    V: Tensor  # [..., r, d_in]
    objective: list[float]  # ||W_s - S - L||_F / ||W_s||_F after each iteration (max over the batch)
    subspace_steps: list[int]  # fast mode: subspace-iteration steps each iteration (0 = full SVD)


@torch.no_grad()
def decompose(
    weight: Tensor,
    second_moment: Tensor,
    rank: int,
    keep_per_row: int,
    num_iters: int,
    nm: tuple[int, int] | None = None,
    svd: str = "fast",
    oversample: int | None = None,
    tol: float = 1e-4,
    max_steps: int = 8,
    track_objective: bool = True,
) -> ThresholdingResult:
    """OATS alternating thresholding with an explicit kept count; see :func:`alternating_thresholding`.

    weight [..., d_out, d_in] (float32 or float64; computed in that precision, at least float32),
    second_moment [..., d_in] (D, mean of x^2 per input). ``keep_per_row`` is ignored with ``nm``.
    ``tol``: fast mode stops subspace iteration once ||A V - U S||_F <= tol * ||A - U S V^T||_F for the
    top-r Ritz pairs; ``max_steps`` caps the steps per outer iteration.
    """
    if svd not in SVD_MODES:
        raise ValueError(f"svd mode {svd!r}; allowed: {SVD_MODES}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    squeeze = weight.dim() == 2
    W = weight.unsqueeze(0) if squeeze else weight
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype)
    Dm = second_moment.to(W.device, dtype).reshape(W.shape[0] if second_moment.dim() > 1 else 1, 1, W.shape[-1])
    d_out, d_in = W.shape[-2:]
    if nm is not None and d_in % nm[1]:
        raise OatsBudgetError(f"N:M {nm[0]}:{nm[1]} needs the input dimension ({d_in}) to be a multiple of M={nm[1]}")
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must lie in [0, min(d_out, d_in) = {min(d_out, d_in)}]")
    if not torch.isfinite(Dm).all():
        raise ValueError("second moments contain NaN or inf; the calibration pass diverged")
    s = safe_second_moment(Dm).sqrt()  # [B, 1, n]
    Ws = W * s
    norm_ws = Ws.double().square().sum((-2, -1)).sqrt().clamp(min=1e-300)
    lowrank = _LowRank(rank, svd, oversample, tol, max_steps) if rank > 0 else None
    threshold = _RowThreshold(keep_per_row) if (nm is None and svd == "fast") else (lambda x: hard_threshold(x, keep_per_row, nm))
    S = torch.zeros_like(Ws)
    Ur = torch.zeros(*Ws.shape[:-1], 0, dtype=dtype, device=W.device)
    sr = torch.zeros(Ws.shape[0], 0, dtype=dtype, device=W.device)
    Vh = torch.zeros(Ws.shape[0], 0, d_in, dtype=dtype, device=W.device)
    objective: list[float] = []
    for _ in range(num_iters):
        if lowrank is not None:
            Ur, sr, Vh = lowrank(Ws - S)
            R = Ws - (Ur * sr.unsqueeze(-2)) @ Vh
        else:
            R = Ws
        S = threshold(R)
        if track_objective:
            objective.append(float(((R - S).double().square().sum((-2, -1)).sqrt() / norm_ws).max()))
    root = sr.clamp(min=0).sqrt()
    U = Ur * root.unsqueeze(-2)
    V = (root.unsqueeze(-1) * Vh) / s
    sparse = S / s
    if squeeze:
        sparse, U, V = sparse[0], U[0], V[0]
    return ThresholdingResult(sparse, U, V, objective, lowrank.steps if lowrank is not None else [])


def alternating_thresholding(
    weight: Tensor,
    second_moment: Tensor,
    rank: int,
    row_sparsity: float,
    num_iters: int,
    nm: tuple[int, int] | None = None,
    **options,
) -> tuple[Tensor, Tensor, Tensor]:
    """OATS on one weight (or a batch of same-shape weights). Returns ``(sparse, U, V)``.

    weight:        [d_out, d_in] (or [B, d_out, d_in]).
    second_moment: [d_in] (or [B, d_in]) D = mean over calibration tokens of x_j^2 (input units squared).
    rank:          r of the low-rank part.
    row_sparsity:  fraction of every row of the sparse part set to zero; ``floor((1 - s) d_in)`` kept.
                   Ignored when ``nm=(N, M)`` (N kept of every M consecutive inputs).
    options:       ``svd`` ('fast' | 'exact'), ``oversample``, ``tol``, ``max_steps`` (see :func:`decompose`).

    ``weight ~= sparse + U @ V`` in the original (unscaled) coordinates: sparse [d_out, d_in] dense-shaped
    with exact zeros, U [d_out, r], V [r, d_in].
    """
    res = decompose(weight, second_moment, rank, keep_per_row_for(weight.shape[-1], row_sparsity), num_iters, nm, **options)
    return res.sparse, res.U, res.V


def scaled_objective(weight: Tensor, second_moment: Tensor, sparse: Tensor, U: Tensor, V: Tensor) -> float:
    """||(W - S - U V) diag(sqrt D)||_F / ||W diag(sqrt D)||_F in float64, with D guarded as in :func:`decompose`."""
    s = safe_second_moment(second_moment.double()).sqrt()
    W = weight.double()
    err = (W - sparse.double() - U.double() @ V.double()) * s
    return float(err.norm() / (W * s).norm())

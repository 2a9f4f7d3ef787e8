"""OATS's math (Zhang & Papyan, ICLR 2025, Algorithm 1): alternating thresholding of a weight scaled
by the square root of its inputs' second moments. Pure tensor functions: no model, no I/O. The budget
split (rank and nonzeros per row) is ``sparse_lowrank.common.oats_budget``.

Notation: ``W`` is [d_out, d_in]; ``D`` [d_in] the mean of x_j^2 over calibration tokens; the scaled
weight is ``W_s = W diag(sqrt D)``. Alternating thresholding from ``S = 0``, ``num_iters`` times:

    L <- best rank-r approximation of (W_s - S)
    S <- keep the k largest |W_s - L| of every row (or N of every M along the input dimension)

then ``S diag(1/sqrt D) + L diag(1/sqrt D)`` approximates ``W``. Both steps minimise the scaled
objective ``||W_s - S - L||_F`` exactly over their own block, so it never increases (exact mode).

Low-rank step, two modes (``svd``):

* ``"exact"``: a full thin SVD of ``W_s - S`` every iteration, as the reference code does.
* ``"fast"`` (default): only the top-r subspace is needed. Iteration 0 takes the top ``l``
  singular triplets of ``W_s`` from the eigenvectors of its Gram (``_top_singular``); later iterations run block subspace iteration on ``l = r + p`` vectors (``p`` oversampling,
  default 8) warm-started from the previous iteration's right singular vectors. Each step is a
  Rayleigh-Ritz projection: the products
  ``Y^T = V^T A^T`` and ``Y^T A``, a float64 Cholesky of the l x l Gram ``Y^T Y`` (the orthonormal basis
  is never formed, see ``_ritz``) and the small l x l eigenproblem in float64. Steps repeat until
  the Ritz residual ``||A v_i - s_i u_i||`` of the top r pairs (estimated with a few Gaussian probes)
  is below ``tol`` times the rank-r approximation error (at most ``max_steps``). Because
  ``W_s - S`` changes little between iterations, one step suffices after the first few. The residual criterion
  ties the subspace error to the objective itself, so the fast loop follows the exact loop's
  trajectory rather than drifting from it (an earlier one-step variant that was within 1% per
  matrix lost 7% perplexity end to end).

Hard thresholding uses ``topk`` (exact count per row) instead of a sort; in fast mode each row starts
from last iteration's cut and moves it past the few entries that crossed it (``_RowThreshold``),
falling back to ``topk`` on ties; the kept set is always a top-k set. The loop carries the kept set as
a 0/1 mask and ``W_s - S``, ``W_s - L`` in buffers reused every iteration (on a CPU, fresh
[d_out, d_in] tensors page-fault each time). N:M is one vectorised ``topk``
over groups. Inputs may carry a leading batch dimension ([B, d_out, d_in] with [B, d_in] moments) so
same-shape matrices run together (useful on a GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_lowrank.common import OatsBudgetError, keep_per_row_for

# D is floored at EPS_REL * max(D) (and at the smallest normal float32 when D is all zero or
# denormal): unscaling divides by sqrt(D), so an input that never fires (D = 0) must not produce
# 0/0 or overflow. 1e-12 keeps sqrt(D_floor) = 1e-6 sqrt(max D), a normal float32, while moving
# no column whose input carries any measurable energy.
EPS_REL = 1e-12
_TINY = torch.finfo(torch.float32).tiny

SVD_MODES = ("fast", "exact")
# fast mode's extra subspace vectors beyond the rank: the step count is set by how much W_s - S moves
# between iterations, not by the spectral gap, so a small block is cheapest (SmolLM2 block 15, 80
# iterations, svd_tol 1e-4: p = 8 and p = r/2 both take ~2.1 steps per iteration, objectives within 0.1%)
OVERSAMPLE = 8
# fast mode's stopping rule: top-r Ritz residual <= SVD_TOL * rank-r error. Each step shrinks the
# residual 20-50x; at 1e-2 all but the first few iterations take one step (1.04 per iteration on
# SmolLM2; 1.25 at 3e-3, 2.15 at 1e-4), and the objective error left is second order in the residual.
# Against the exact loop on SmolLM2 at 50% (README, "Fast vs exact"): per-matrix objectives within
# 0.3% at all three tolerances; WikiText-2 perplexities 61.96, 59.95, 63.63 scatter around the exact
# loop's own 62.76 and 58.89 (one and two threads: runs that differ only in float summation order).
SVD_TOL = 1e-2


def safe_second_moment(second_moment: Tensor, eps_rel: float = EPS_REL) -> Tensor:
    """D floored at ``eps_rel * max(D)`` (per matrix along the last dim), and at the smallest normal float32."""
    d = second_moment.clamp(min=0)
    floor = (d.amax(dim=-1, keepdim=True) * eps_rel).clamp(min=_TINY)
    return torch.maximum(d, floor)


def hard_threshold_mask(x: Tensor, keep_per_row: int, nm: tuple[int, int] | None = None) -> Tensor:
    """[..., d_out, d_in] -> 0/1 mask in x's dtype of the ``keep_per_row`` largest |x| of every row
    (or, with ``nm=(N, M)``, of the N largest of every M consecutive entries of a row).

    Exactly ``keep_per_row`` (N:M: N per group) ones in every row, even with ties.
    """
    d_in = x.shape[-1]
    if nm is not None:
        n, m = nm
        groups = x.reshape(*x.shape[:-1], d_in // m, m)
        idx = groups.abs().topk(n, dim=-1, sorted=False).indices
        return torch.zeros_like(groups).scatter_(-1, idx, 1.0).reshape(x.shape)
    if keep_per_row >= d_in:
        return torch.ones_like(x)
    if keep_per_row <= 0:
        return torch.zeros_like(x)
    idx = x.abs().topk(keep_per_row, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, 1.0)


def hard_threshold(x: Tensor, keep_per_row: int, nm: tuple[int, int] | None = None) -> Tensor:
    """[..., d_out, d_in] -> x with all but the ``keep_per_row`` largest |x| of every row zeroed
    (or, with ``nm=(N, M)``, all but the N largest of every M consecutive entries of a row).

    Exactly ``keep_per_row`` (N:M: N per group) entries survive in every row, even with ties.
    """
    return x * hard_threshold_mask(x, keep_per_row, nm)


def _nonvanishing(sig: Tensor, dtype: torch.dtype, size: int) -> Tensor:
    """sig [B, l] -> bool [B, l]: the singular values above rounding level (eps(dtype) * size * max sig).
    The vectors that come from dividing by the others get zeros instead of rounding noise / ~0."""
    return sig > sig.amax(-1, keepdim=True) * (torch.finfo(dtype).eps * size)


def _ritz(A: Tensor, Yt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One subspace-iteration step: Rayleigh-Ritz of A [B,m,n] on range(Y), Yt = (A V)^T = V^T A^T [B,l,m].

    Returns (Xt [B,l,m], C [B,l,l], sigma [B,l] descending, Vh [B,l,n]) with A ~ (C^T Xt)^T diag(sigma) Vh,
    (Xt^T C) having orthonormal columns (the left Ritz vectors). The basis of range(Y) is never formed:
    with the Cholesky factor R of the Gram Y^T Y (float64), Q = Y R^{-1} gives Q^T A = R^{-T} (Y^T A)
    and Q Ub = Y (R^{-1} Ub), so only l x l and l x n triangular solves are needed. When Y is too
    ill-conditioned for that, Xt is a Householder basis of range(Y) instead. The small l x l
    eigenproblem of (Q^T A)(Q^T A)^T is solved in float64. (Y is carried transposed: with l not a
    multiple of the SIMD width, BLAS computes V^T A^T up to 1.4x faster than A V on a CPU.)
    """
    Yd = Yt.double()
    R, info = torch.linalg.cholesky_ex(Yd @ Yd.mT, upper=True)
    d = R.diagonal(dim1=-2, dim2=-1)
    # Cholesky QR trusted while cond(Y) stays below ~1e4 (float32 products lose eps32 * cond(Y))
    ok = bool((info == 0).all()) and bool((d.amin(-1) > 1e-4 * d.amax(-1)).all())
    if ok:
        # Q^T A [B, l, n], in A's precision: Y^T A already carries that rounding, times cond(R)
        B = torch.linalg.solve_triangular(R.mT.to(A.dtype), Yt @ A, upper=False)
        Xt = Yt
    else:
        R = None
        Xt = torch.linalg.qr(Yt.mT).Q.mT
        B = Xt @ A
    Bd = B.double()
    lam, Ub = torch.linalg.eigh(Bd @ Bd.mT)
    lam, Ub = lam.flip(-1).clamp(min=0), Ub.flip(-1)
    sig = lam.sqrt()
    C = Ub if R is None else torch.linalg.solve_triangular(R, Ub, upper=True)
    # right Ritz vectors v_i = B^T ub_i / s_i. A numerically vanishing s_i (A of lower rank than l)
    # gets a zero row instead of rounding noise divided by ~0: harmless, it only seeds the next step's
    # basis, which the Householder fallback re-orthonormalises.
    Vh = (Ub.to(A.dtype).mT @ B) / sig.clamp(min=torch.finfo(torch.float64).tiny).to(A.dtype).unsqueeze(-1)
    Vh = torch.where(_nonvanishing(sig, A.dtype, max(B.shape[-2:])).unsqueeze(-1), Vh, 0.0)
    return Xt, C.to(A.dtype), sig, Vh


def _top_singular(A: Tensor, l: int) -> tuple[Tensor, Tensor, Tensor]:
    """A [B,m,n] -> its top l singular triplets (U [B,m,l], sigma [B,l] descending, Vh [B,l,n]) in A's dtype.

    From the eigenvectors of the Gram of the short side (A^T A or A A^T, formed in A's precision and
    solved in float64); the other side's vectors are A v_i / s_i (or A^T u_i / s_i). Squaring costs
    accuracy only in singular values below ~sqrt(eps) s_1, far under the top l of a weight matrix; on
    SmolLM2's weights the top singular values agree with a float32 thin SVD to 1e-6. A numerically
    vanishing s_i gets a zero vector on the other side.
    """
    m, n = A.shape[-2:]
    tall = m >= n
    lam, E = torch.linalg.eigh((A.mT @ A if tall else A @ A.mT).double())
    sig = lam[..., -l:].flip(-1).clamp(min=0).sqrt()
    E = E[..., -l:].flip(-1).to(A.dtype)  # [B, short, l]
    inv = torch.where(_nonvanishing(sig, A.dtype, max(m, n)), 1 / sig.clamp(min=torch.finfo(torch.float64).tiny), 0.0).to(A.dtype)
    if tall:
        return (A @ E) * inv.unsqueeze(-2), sig.to(A.dtype), E.mT.contiguous()
    return E, sig.to(A.dtype), (E.mT @ A) * inv.unsqueeze(-1)


class _LowRank:
    """The low-rank step of alternating thresholding, exact or warm-started subspace iteration."""

    PROBES = 8  # Gaussian probes of the convergence estimate

    def __init__(self, rank: int, svd: str, oversample: int | None, tol: float, max_steps: int):
        self.r, self.svd, self.tol, self.max_steps = rank, svd, tol, max_steps
        self.oversample = oversample
        self.Vh: Tensor | None = None  # [B, l, n] warm start (fast mode)
        self.steps: list[int] = []  # subspace-iteration steps per call (fast mode), for the record
        self._gen: torch.Generator | None = None

    def _probes(self, A: Tensor) -> Tensor:
        if self._gen is None:
            self._gen = torch.Generator(A.device).manual_seed(0)
        return torch.randn(A.shape[0], self.PROBES, A.shape[-2], generator=self._gen, device=A.device, dtype=A.dtype)

    def __call__(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A [B, m, n] -> (U [B,m,r], sigma [B,r], Vh [B,r,n]) in A's dtype: best rank-r approximation factors."""
        # (running tall matrices through A^T, so the small products scale with min(m, n), measured 12-15%
        # slower on gate/up_proj: the transposing copy every iteration costs more than it saves)
        r = self.r
        m, n = A.shape[-2:]
        p = self.oversample if self.oversample is not None else OVERSAMPLE
        l = min(r + p, m, n)
        if self.svd == "exact" or l >= min(m, n):
            U, sig, Vh = torch.linalg.svd(A, full_matrices=False)
            if self.svd == "fast":
                self.steps.append(0)
            return U[..., :r], sig[..., :r], Vh[..., :r, :]
        if self.Vh is None:  # first call: the top l triplets, from the Gram matrix (1.5-2.5x faster than a thin SVD)
            U, sig, Vh = _top_singular(A, l)
            self.Vh = Vh
            self.steps.append(0)
            return U[..., :r], sig[..., :r], Vh[..., :r, :]
        a2 = torch.linalg.vector_norm(A, dim=(-2, -1)).double().square()
        G = self._probes(A)  # [B, p, m]
        GA = G @ A  # [B, p, n]
        Vh = self.Vh
        steps = 0
        while True:
            Xt, C, sig, Vh = _ritz(A, Vh @ A.mT)
            steps += 1
            Ur = (C[..., :r].mT @ Xt).mT
            sr = sig[..., :r]
            if steps >= self.max_steps:
                break
            # Ritz residual of the top r pairs, E = A V_r - U_r diag(s_r) (A^T u_i - s_i v_i is zero by
            # construction), against the rank-r error ||A||^2 - sum s_i^2 that the objective sees.
            # ||E||_F^2 is estimated as ||G E||_F^2 / p with p Gaussian probes G [p, m] (G A is formed once),
            # a p/l fraction of a product with A. Each step shrinks the residual 20-50x, so the estimate's
            # spread (chi-square with p r degrees of freedom) does not change the step count in practice.
            GE = GA @ Vh[..., :r, :].mT - (G @ Ur) * sr.to(A.dtype).unsqueeze(-2)
            res2 = GE.square().sum((-2, -1)).double() / self.PROBES
            # (floored at rounding level: a matrix of rank <= r has no error left to converge against)
            tail2 = torch.maximum(a2 - sr.square().sum(-1), a2 * torch.finfo(A.dtype).eps)
            if bool((res2 <= self.tol**2 * tail2).all()):
                break
        self.Vh = Vh
        self.steps.append(steps)
        return Ur, sr.to(A.dtype), Vh[..., :r, :]


class _RowThreshold:
    """Hard thresholding to ``k`` per row, warm-started from last iteration's per-row cut.

    Each row keeps the entries with ``|x| >= cut``. Where that count is off by ``d`` (a few entries:
    the residual changes little between iterations), the cut moves past the ``|d|`` entries nearest to
    it among the kept entries (``d > 0``) or the dropped ones (``d < 0``): for ``|d| <= AMAX_SHIFT``
    by ``|d| + 1`` rounds of row maxima (a handful of cheap passes), beyond that by a ``topk`` of size
    ``|d| + 1`` (rows bucketed by ``|d|``), both far cheaper than a ``topk`` of size k over the row.
    The new cut lies midway between the k-th and (k+1)-th largest |x|; a row where it still does not
    select exactly k entries (ties at the cut, or a count off by more than ``max_shift``) falls back
    to ``topk``. Whenever a cut selects exactly k entries, every selected |x| exceeds every unselected
    one, so the result is a top-k set, the same as ``topk``'s up to the order of ties.

    Masks are 0/1 in x's dtype, written into buffers kept across calls: on a CPU a bool mask costs
    several times more per pass than a float one, and a fresh [d_out, d_in] buffer every call
    page-faults (the allocator hands large blocks back to the OS).
    """

    AMAX_SHIFT = 3
    BUCKETS = (8,)

    def __init__(self, k: int, max_shift: int = 32):
        self.k, self.max_shift = k, max_shift
        self.cut: Tensor | None = None  # [rows, 1], rows = batch * d_out
        self.topk_rows = 0  # rows that needed a full topk after the first call (diagnostics, tests)
        self._abs: Tensor | None = None  # [rows, n] buffers reused across calls
        self._keep: Tensor | None = None

    def _topk_rows(self, a: Tensor) -> Tensor:
        """[r, n] -> cuts [r, 1] midway between the k-th and (k+1)-th largest entries of each row."""
        if self.cut is not None:
            self.topk_rows += a.shape[0]
        vals = a.topk(self.k + 1, dim=-1, sorted=True).values
        return ((vals[:, self.k - 1] + vals[:, self.k]) / 2).unsqueeze(-1)

    @staticmethod
    def _moved_cuts(rows: Tensor, kept: Tensor, d: Tensor, by_max: bool) -> Tensor:
        """rows |x| [r, n], kept 0/1 [r, n], d [r] (kept minus wanted, nonzero) -> new cuts [r, 1]
        midway between the k-th and (k+1)-th largest entries of each row. (In-place arithmetic: each
        temporary is a fresh block of memory to fault in.)"""
        j = d.abs().unsqueeze(-1)  # [r, 1]
        j_max = int(j.max())
        over = (d > 0).to(rows.dtype).unsqueeze(-1)
        sign = 1 - 2 * over  # -1 where too many are kept
        big = torch.finfo(rows.dtype).max
        # d > 0: the smallest kept entries (as -|x|); d < 0: the largest dropped ones; the rest sink to -big
        y = rows.mul_(sign)
        t = kept.sub_(over).abs_().mul_(big)
        y -= t
        if by_max:  # the j_max + 1 largest y of each row, one row maximum at a time
            vals = []
            for _ in range(j_max + 1):
                v = y.amax(-1, keepdim=True)
                vals.append(v)
                y -= torch.ge(y, v, out=t).mul_(big)
            top = torch.cat(vals, -1)
        else:
            top = y.topk(j_max + 1, dim=-1, sorted=True).values
        # (an exact tie at a maximum removes both copies at once: the cut is then off, and the count check catches it)
        return top.gather(-1, torch.cat([j - 1, j], -1)).sum(-1, keepdim=True) / 2 * sign

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., d_out, d_in] -> x with all but the k largest |x| of every row zeroed."""
        return x * self.mask(x)

    def mask(self, x: Tensor) -> Tensor:
        """x [..., d_out, d_in] -> 0/1 mask in x's dtype (a buffer reused by the next call) of the k largest |x| of every row."""
        k, n = self.k, x.shape[-1]
        if k >= n:
            return torch.ones_like(x)
        if k <= 0:
            return torch.zeros_like(x)
        if self._abs is None or self._abs.shape != (x.numel() // n, n) or self._abs.dtype != x.dtype:
            self._abs = torch.empty(x.numel() // n, n, dtype=x.dtype, device=x.device)
            self._keep = torch.empty_like(self._abs)
        a = torch.abs(x.reshape(-1, n), out=self._abs)
        if self.cut is None:
            self.cut = self._topk_rows(a)
        keep = torch.ge(a, self.cut, out=self._keep)
        shift = keep.sum(-1)
        shift -= k
        bad = shift.nonzero().squeeze(-1)
        if bad.numel():
            d = shift.index_select(0, bad).long()
            j = d.abs()
            lo = 0
            # the cost of a move grows with |d|: bucket the rows
            for hi, by_max in [(self.AMAX_SHIFT, True)] + [(b, False) for b in self.BUCKETS] + [(self.max_shift, False)]:
                hi = min(hi, self.max_shift)
                if hi > lo:
                    grp = ((j > lo) & (j <= hi)).nonzero().squeeze(-1)
                    if grp.numel():
                        idx = bad.index_select(0, grp)
                        moved = self._moved_cuts(a.index_select(0, idx), keep.index_select(0, idx), d.index_select(0, grp), by_max)
                        self.cut.index_copy_(0, idx, moved)
                    lo = hi
            far = bad[j > self.max_shift]
            if far.numel():
                self.cut.index_copy_(0, far, self._topk_rows(a.index_select(0, far)))
            keep = torch.ge(a, self.cut, out=self._keep)
            wrong = (keep.sum(-1) != k).nonzero().squeeze(-1)  # ties at the new cut
            if wrong.numel():
                wrows = a.index_select(0, wrong)
                wcut = self._topk_rows(wrows)
                self.cut.index_copy_(0, wrong, wcut)
                wkeep = torch.ge(wrows, wcut, out=torch.empty_like(wrows))
                still = (wkeep.sum(-1) != k).nonzero().squeeze(-1)
                if still.numel():  # exact ties across the k-th place: keep topk's choice
                    top = wrows.index_select(0, still).topk(k, dim=-1).indices
                    wkeep.index_copy_(0, still, wkeep.new_zeros(len(still), n).scatter_(-1, top, 1.0))
                keep.index_copy_(0, wrong, wkeep)
        return keep.view(x.shape)


@dataclass
class ThresholdingResult:
    """What :func:`decompose` returns: factors in original coordinates plus facts for the record."""

    sparse: Tensor  # [..., d_out, d_in], exact zeros outside the kept entries
    U: Tensor  # [..., d_out, r]
    V: Tensor  # [..., r, d_in]
    objective: list[float]  # ||W_s - S - L||_F / ||W_s||_F after each iteration, or only the last (max over the batch)
    subspace_steps: list[int]  # fast mode: subspace-iteration steps each iteration (0 = full SVD)


def _relative_error(E: Tensor, norm_ws: Tensor) -> float:
    """max over the batch of ||E||_F / ||W_s||_F, E [B, m, n] (float64 accumulation)."""
    return float((E.square().sum((-2, -1), dtype=torch.float64).sqrt() / norm_ws).max())


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
    tol: float = SVD_TOL,
    max_steps: int = 8,
    track_objective: bool = True,
) -> ThresholdingResult:
    """OATS alternating thresholding with an explicit kept count; see :func:`alternating_thresholding`.

    weight [..., d_out, d_in] (float32 or float64; computed in that precision, at least float32),
    second_moment [..., d_in] (D, mean of x^2 per input). ``keep_per_row`` is ignored with ``nm``.
    ``track_objective``: record the scaled objective after every iteration (one float64 pass each);
    when False only the final one is recorded.
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
    select = _RowThreshold(keep_per_row).mask if (nm is None and svd == "fast") else (lambda x: hard_threshold_mask(x, keep_per_row, nm))
    Ur = torch.zeros(*Ws.shape[:-1], 0, dtype=dtype, device=W.device)
    sr = torch.zeros(Ws.shape[0], 0, dtype=dtype, device=W.device)
    Vh = torch.zeros(Ws.shape[0], 0, d_in, dtype=dtype, device=W.device)
    # W_s - S and W_s - L live in buffers reused every iteration: on a CPU a fresh [d_out, d_in]
    # tensor per iteration page-faults (the allocator hands large blocks back to the OS), which cost
    # as much as the thresholding itself. S = keep * (W_s - L) is only formed for the record and at
    # the end; the next iteration's W_s - S comes from the mask in one pass.
    A = Ws.clone()  # W_s - S, S = 0
    R = torch.empty_like(Ws) if lowrank is not None else Ws
    objective: list[float] = []
    for _ in range(num_iters):
        if lowrank is not None:
            Ur, sr, Vh = lowrank(A)
            torch.baddbmm(Ws, Ur * sr.unsqueeze(-2), Vh, alpha=-1, out=R)
        keep = select(R)
        torch.addcmul(Ws, R, keep, value=-1, out=A)
        if track_objective:
            objective.append(_relative_error(R - R * keep, norm_ws))
    S = R * keep
    if not track_objective:
        objective.append(_relative_error(R - S, norm_ws))
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

"""Full-Gram sparse + low-rank: alternating minimisation of the layer's output error at the OATS budget.

HASSLE-free (Makni et al., CPAL 2025) and 3BASiL (NeurIPS 2025) approximate a weight ``W`` [d_out, d_in]
by a sparse ``S`` plus a low-rank ``L = U V`` so as to reproduce the layer's *outputs*, i.e. they
minimise the full layer-wise objective

    f(S, L) = ||X (W - S - L)^T||_F^2 = tr((W - S - L) H (W - S - L)^T),   H = X^T X

where OATS (``sparse_lowrank.decompose``) minimises the diagonal surrogate ``||(W - S - L) diag(sqrt D)||_F^2``
(only ``diag H``). Both halves of the alternation use the whole Gram:

* **low-rank step** (given S): reduced-rank regression. With ``H^{1/2}`` the symmetric square root,
  ``f = ||(W - S - L) H^{1/2}||_F^2``, so the minimiser over rank-r ``L`` is
  ``L = [best rank-r of (W - S) H^{1/2}] H^{-1/2}`` (Eckart-Young in the ``H^{1/2}`` coordinates). The
  exact solver computes it exactly: one float64 eigendecomposition of H per layer, a float64 thin SVD per iteration.
  Returned as ``U = P_r Sigma_r^{1/2}`` [d_out, r], ``V = Sigma_r^{1/2} Z_r^T H^{-1/2}`` [r, d_in].
* **sparse step** (given L): prune the target ``T = W - L`` against H, two variants
  (``sparse_step``, config key ``gram_slr_sparse_step``; default ``'optima'``, the lower objective on
  every SmolLM2 matrix measured, see ``DEFAULT_ITERS``):

  - ``'sparsegpt'``: SparseGPT's OBS sweep (``baselines.sparsegpt.sparsegpt_prune``) on ``T``, scope
    'row' with a sparsity chosen so that exactly ``keep_per_row`` weights survive in every row (N:M:
    its own N-of-M rule). Mask and values are chosen together, greedily: not an exact minimiser.
  - ``'optima'``: a Wanda-style mask ``|T_ij| sqrt(H_jj)`` (k per row, or N of every M), then the
    exact QP on that mask, ``S_K = H_KK^{-1} (H t)_K`` row by row, by OPTIMA's batched preconditioned
    CG (``weight_updates.optima.batched``), warm-started from the previous S.

Start (``init``, config key ``gram_slr_init``): ``'sparse'`` (default) sets ``L = 0``, so iteration
0's sparse step is plain SparseGPT (or Wanda + OPTIMA) on W; ``'lowrank'`` sets ``S = 0`` as OATS does,
so L starts as the reduced-rank regression of W. Every iteration is then a sparse step followed by a
low-rank step, and the objective is recorded after each iteration (the state always ends on an exact
low-rank step). The start matters: on a planted ``S0 + U0 V0`` (k per row, rank r, both at the
budget) the L-first loop finds the planted mask exactly, while the S-first loop keeps ~2% wrong
entries and stalls near 1e-2; on SmolLM2-135M (block 3, q_proj and k_proj at 50% and 70%, both sparse
steps, 30 iterations) the S-first loop ends 0-10% lower in 7 of the 8 cases (q_proj 50% 'optima':
0.4% higher), hence the default.

Where we depart from the papers:

* **Budget**: exactly OATS's (``sparse_lowrank.common.oats_budget``): rank ``r`` and ``keep_per_row`` k (or
  N:M) from ``sparsity`` and ``rank_ratio``, so the two methods keep the same parameter count.
* **H** is ``stats.gram`` dampened like SparseGPT: ``percdamp * mean(diag H)`` added to the diagonal
  (raised tenfold until a float64 Cholesky succeeds, ``weight_updates.optima.dampen``); the objective, both
  steps and the reported numbers all use this dampened H.
* **Monotone by construction**: the low-rank step never increases f (exact minimiser). A sparse step
  is not (it picks a new mask), so its result is kept only if f does not increase; otherwise the
  previous mask is kept and its weights are re-solved exactly for the new target ``W - L`` (the QP
  above, warm-started from the previous S, which is feasible for it, so f cannot increase). When that
  makes no progress either, every later step would repeat itself and the loop stops
  (``info['gram_slr_stopped_early']``). So the sparse step ``'sparsegpt'`` is SparseGPT's proposal
  with an OPTIMA fall-back; ``info['gram_slr_rejected_steps']`` counts the fall-backs.
* **Inexact inner solves** (``solver``, config key ``gram_slr_solver``; default ``'fast'``): the loop only
  needs descent, so by default each sparse step's QP gets two float32 CG steps (warm-started, the
  tolerance tightening as the loop converges; preconditioned by Jacobi with the Gram's top 16
  correlation directions taken out, ``Deflation``) and the low-rank step OATS's warm-started subspace
  iteration instead of a full SVD, with the objective checked in float64 after every iteration and
  tighter solves (or the previous iterate) where it rose (``_fast_loop``). ``'exact'`` is the loop
  described above, every QP to ``optima_tol`` and a float64 SVD per iteration: the reference. On
  SmolLM2-135M block 3 at 50% (32 C4 windows x 512 tokens, 20 iterations) the fast solver ends within 1%
  of the exact one (from -0.2% on o_proj to +0.8% on v_proj) at 1/5 (k_proj) to 1/9 (down_proj) of its
  CPU time (one thread, a shared CPU; see ``DEFAULT_PRECOND_RANK``).
* With ``rank = 0`` (``rank_ratio 0``) this is a single sparse step: row-scoped SparseGPT with exact
  per-row counts (or Wanda + OPTIMA).

Caveat (measured, one block): a lower layer objective on the calibration Gram is not a lower error on
new inputs. SmolLM2-135M block 3 at 50%, all seven linears compressed, calibration 32 C4 windows x 256
tokens, block output error ||block_c(h) - block(h)||^2 / ||block(h)||^2 on the calibration windows /
on 8 held-out windows: OATS 5.16e-3 / 4.89e-3, SparseGPT 4.43e-3 / 4.95e-3, gram_slr (10 iterations)
4.22e-3 / 4.97e-3, gram_slr with percdamp 0.1 4.22e-3 / 4.88e-3, SparseGPT with percdamp 0.1
4.45e-3 / 4.84e-3. With 8 windows the gap was wider (gram_slr 3.10e-3 / 7.86e-3 against OATS
5.08e-3 / 5.32e-3): the full Gram fits the calibration tokens more tightly than OATS's diagonal.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from baselines.masks import keep_topk_rows, nm_mask
from baselines.sparsegpt import KEYS as SPARSEGPT_KEYS
from baselines.sparsegpt import sparsegpt_prune
from oats.interface import Budget, CompressedWeight, InputStats, Method
from oats.keys import Key, KeyTable, choice, non_negative, positive
from sparse_lowrank.common import RANK_RATIO, budget_info, build_module, oats_budget, validate
from sparse_lowrank.decompose import SVD_TOL, _LowRank, _RowThreshold
from sparse_lowrank.masked_cg import Deflation, MaskedDeflation, lower_matmul, masked_cg
from weight_updates.optima import KEYS as OPTIMA_KEYS
from weight_updates.optima import batched, dampen

log = logging.getLogger(__name__)

SPARSE_STEPS = ("sparsegpt", "optima")
INITS = ("sparse", "lowrank")
SOLVERS = ("fast", "exact")

# Measured on SmolLM2-135M block 3 (8 C4 windows x 256 tokens; relative objective
# sqrt(f / tr(W H W^T)) after 5 / 10 / 20 / 40 iterations, OATS's 80 iterations measured in the same norm):
#   q_proj 50%:    optima .0923 .0857 .0811 .0800   sparsegpt .0932 .0915 .0910 .0908   OATS .0972
#   q_proj 70%:    optima .1708 .1665 .1651 .1650   sparsegpt .1709 .1704 .1703 .1703   OATS .1967
#   v_proj 50%:    optima .1838 .1729 .1655 .1616   sparsegpt .1844 .1820 .1814 .1812   OATS .2115
#   v_proj 70%:    optima .3372 .3304 .3263 .3263   sparsegpt .3299 .3290 .3290 .3290   OATS .3924
#   o_proj 50%:    optima .1199 .1119 .1083 .1077   sparsegpt .1310 .1271 .1247 .1232   OATS .1865
#   o_proj 70%:    optima .2330 .2259 .2240 .2238   sparsegpt .2468 .2439 .2422 .2413   OATS .3556
#   q_proj 2:4 at 40%: optima .0851 .0796 .0758 .0736   sparsegpt .0826 .0803 .0796 .0794   OATS .0993
# 'sparsegpt' settles within 10 iterations (after the first few, nearly every SparseGPT proposal is
# refused and the fixed-mask QP fall-back does the work); 'optima' keeps improving and is the lower
# of the two everywhere, hence the default. 20 iterations are within 0-3% of 40 at half the cost.
DEFAULT_ITERS = 20

# The fast solver's inner solves (``_fast_loop``): at most ``gram_slr_inner_iters`` preconditioned CG steps
# per sparse step (float32), stopped earlier once every row's relative residual is below
# max(optima_tol, min(INNER_TOL_MAX, INNER_TOL_FACTOR * sqrt(delta))), delta the relative decrease of f in
# the previous outer iteration: a residual rho leaves an objective excess of order rho^2, so the solve
# is kept well below what the outer loop still gains, and tightens as it converges. The cap matters on
# small problems, where a loose tolerance is met in one step: without it (tolerance up to 0.45 early
# on) a planted 32 x 64 problem at 60% ended in another mask, its objective 1.2x higher than the exact
# solver's; with it, at 1e-3, every planted case tried ends on the exact solver's mask (tests).
# The preconditioner (``Deflation``, config key ``gram_slr_precond_rank``): Jacobi with the Gram's top
# DEFAULT_PRECOND_RANK correlation directions taken out, at the cost of a fraction of a product a step (OPTIMA's
# P H^-1 P costs a second product; on SmolLM2 it gave Jacobi's objective per step). On one fixed QP of
# SmolLM2-135M block 3 (its final mask and target, warm start) the excess over the optimum after 2 / 4 CG
# steps: o_proj Jacobi 1.3e-2 / 6.1e-3, top 32 taken out 4.2e-3 / 1.4e-3; down_proj Jacobi 1.5e-3 / 2.4e-4,
# top 32 3.6e-4 / 1.5e-5. Whole loop, the same block (32 C4 windows x 512 tokens, 20 iterations, relative
# objective against 4 Jacobi steps): 2 steps with 16 directions -0.1% to +0.3% at 50% (7 layers), -0.1%
# to +0.1% at 70%, at about 80% of the CPU time; 2 Jacobi steps +0.5% to +5.6% (o_proj); 3 Jacobi steps
# 0% to +1.2%; 32 directions no better than 16 at 2 steps, and their per-row k x k inverses cost more.
DEFAULT_PRECOND_RANK = 16
INNER_TOL_FACTOR = 0.1
INNER_TOL_MAX = 1e-3
DEFAULT_INNER_ITERS = 2

# below this share of ||M||^2 the fast loop's objective is computed directly, not by its expansion (``obj``)
OBJ_EXPANSION_FLOOR = 1e-4

# The fast loop's M = (W - S) C comes from a float32 product (S is the CG's float32 iterate, W C is formed
# once in float64) while f is at least F32_M_FLOOR ||M||^2 (0.16-0.20 on SmolLM2's layers at 50%); below it
# (a nearly exact fit) from a float64 one. Measured on SmolLM2-135M block 3: the float32 M is off by
# 3e-7 to 7e-7 of ||M||, which moves f by 1e-10 to 3e-9 of f (at most 2 ||dM|| sqrt(f), 6e-6 f at the
# floor, in the worst alignment). Where f_new and f differ by less than F32_M_MARGIN f, both are recomputed
# from float64 M's before they are compared, so every accept/reject is exact.
F32_M_FLOOR = 0.05
F32_M_MARGIN = 1e-5

# Its own keys, and the keys it shares with OATS (the budget), SparseGPT (dampening, block size) and
# OPTIMA (the QP solver), declared by their owners and reused here so the two can never differ.
KEYS = KeyTable({
    "rank_ratio": RANK_RATIO,
    "gram_slr_iters": Key(DEFAULT_ITERS, (int,), "gram_slr: alternating iterations (sparse step then low-rank step)", positive),
    "gram_slr_sparse_step": Key("optima", (str,), "gram_slr sparse step: `sparsegpt` (OBS sweep on W - L) or `optima` (Wanda-style mask + QP re-solve of its kept weights)", choice(*SPARSE_STEPS)),
    "gram_slr_init": Key("sparse", (str,), "gram_slr start: `sparse` (L = 0, the first sparse step sees W) or `lowrank` (S = 0, L = reduced-rank regression of W, as OATS)", choice(*INITS)),
    "gram_slr_solver": Key("fast", (str,), "gram_slr inner solves: `fast` (a few CG steps in `optima_dtype` per sparse step, warm-started subspace iteration for the low-rank step, objective checked every iteration) or `exact` (every QP to `optima_tol`, a float64 SVD per low-rank step: the reference)", choice(*SOLVERS)),
    "gram_slr_inner_iters": Key(DEFAULT_INNER_ITERS, (int,), "gram_slr `fast` solver: CG steps at most per sparse step (fewer once the residual is below the tightening tolerance)", positive),
    "gram_slr_precond_rank": Key(DEFAULT_PRECOND_RANK, (int,), "gram_slr `fast` solver: top correlation directions of the Gram taken out of the CG's Jacobi preconditioner (0 = plain Jacobi)", non_negative),
    "percdamp": SPARSEGPT_KEYS["percdamp"],
    "blocksize": SPARSEGPT_KEYS["blocksize"],
    **{k: OPTIMA_KEYS[k] for k in ("optima_tol", "optima_max_iters", "optima_dtype")},
})


def gram_objective(E: Tensor, H: Tensor) -> float:
    """tr(E H E^T) in float64 for E [d_out, d_in], H [d_in, d_in]."""
    Ed = E.double()
    return float(((Ed @ H.double()) * Ed).sum())


@dataclass
class SqrtH:
    """The symmetric square root of a positive definite H and its inverse (float64)."""

    half: Tensor  # H^{1/2} [d_in, d_in]
    inv_half: Tensor  # H^{-1/2} [d_in, d_in]

    @classmethod
    def of(cls, H: Tensor) -> "SqrtH":
        """From H = Q diag(lam) Q^T (float64 eigendecomposition); lam must be > 0 (dampen H first)."""
        lam, Q = torch.linalg.eigh(H.double())
        if not bool((lam > 0).all()):
            raise ValueError(f"H must be positive definite (smallest eigenvalue {float(lam.min()):.3g}); dampen it first")
        root = lam.sqrt()
        half, inv_half = (Q * root) @ Q.T, (Q / root) @ Q.T
        return cls(half=(half + half.T) / 2, inv_half=(inv_half + inv_half.T) / 2)  # symmetric to the last bit


def lowrank_step(R: Tensor, sqrt_h: SqrtH, rank: int) -> tuple[Tensor, Tensor]:
    """argmin over rank-``rank`` L of tr((R - L) H (R - L)^T), as factors (U [d_out, r], V [r, d_in]), float64.

    L = U V = [best rank-r of R H^{1/2}] H^{-1/2} (reduced-rank regression; unique when the r-th and
    (r+1)-th singular values of R H^{1/2} differ).
    """
    d_out, d_in = R.shape
    if rank <= 0:
        z = R.new_zeros((), dtype=torch.float64)
        return z.expand(d_out, 0).clone(), z.expand(0, d_in).clone()
    M = R.double() @ sqrt_h.half
    P, sig, Zt = torch.linalg.svd(M, full_matrices=False)
    root = sig[:rank].sqrt()
    U = P[:, :rank] * root
    V = (root[:, None] * Zt[:rank]) @ sqrt_h.inv_half
    return U, V


def _row_sparsity_for(d_in: int, keep: int) -> float:
    """A sparsity s with floor(d_in * s) == d_in - keep in floating point (for 0 < keep < d_in), and s < 1."""
    s = (d_in - keep + 0.5) / d_in
    assert math.floor(d_in * s) == d_in - keep and s < 1
    return s


def wanda_gram_mask(T: Tensor, H: Tensor, keep_per_row: int, nm: tuple[int, int] | None) -> Tensor:
    """Boolean mask of |T_ij| sqrt(H_jj): k largest per row, or N largest of every M (True = kept)."""
    scores = T.abs().double() * torch.diagonal(H).double().clamp(min=0).sqrt()[None, :]
    if nm is not None:
        return nm_mask(scores, *nm)
    return keep_topk_rows(scores, keep_per_row)


def sparse_step(
    T: Tensor,
    H: Tensor,
    keep_per_row: int,
    nm: tuple[int, int] | None = None,
    method: str = "sparsegpt",
    blocksize: int = 128,
    H_inv: Tensor | None = None,
    init: Tensor | None = None,
    optima_tol: float = 1e-6,
    optima_max_iters: int = 500,
    optima_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Sparse approximation of the target T [d_out, d_in] in the H-norm, k per row (or N:M).

    H [d_in, d_in]: positive definite (already dampened; SparseGPT is run with no further dampening).
    method 'sparsegpt': OBS sweep, mask and values chosen together; 'optima': Wanda-style mask on
    |T| sqrt(diag H), then the exact per-row QP on it (batched PCG, ``H_inv`` as preconditioner,
    warm start ``init`` [d_out, d_in] or T masked). Returns (S float64 with exact zeros off the mask,
    bool mask, info).
    """
    if method not in SPARSE_STEPS:
        raise ValueError(f"sparse step {method!r}; allowed: {SPARSE_STEPS}")
    d_out, d_in = T.shape
    if nm is None and keep_per_row >= d_in:
        return T.double().clone(), torch.ones_like(T, dtype=torch.bool), {}
    if nm is None and keep_per_row <= 0:
        return torch.zeros_like(T, dtype=torch.float64), torch.zeros_like(T, dtype=torch.bool), {}
    if method == "sparsegpt":
        sparsity = 0.0 if nm is not None else _row_sparsity_for(d_in, keep_per_row)
        S, mask, info = sparsegpt_prune(T.double(), H, sparsity, nm=nm, blocksize=blocksize, percdamp=0.0, scope="row")
        want = nm[0] * (d_in // nm[1]) if nm is not None else keep_per_row
        if not bool((mask.sum(1) == want).all()):  # cannot happen (topk counts); a guard on the budget
            raise RuntimeError(f"SparseGPT kept {mask.sum(1).tolist()} per row, expected {want}")
        S = torch.where(mask, S.double(), torch.zeros((), dtype=torch.float64, device=S.device))
        return S, mask, {"obs_loss": info.get("obs_loss")}
    mask = wanda_gram_mask(T, H, keep_per_row, nm)
    start = T.double() if init is None else torch.where(mask, init.double(), T.double())
    S, info = batched(T.double(), H.double(), mask, optima_tol, optima_max_iters, optima_dtype, init=start,
                      precond="hinv" if H_inv is not None else "jacobi", H_inv=H_inv)
    S = torch.where(mask, S.double(), torch.zeros((), dtype=torch.float64, device=S.device))
    return S, mask, {"optima_iters": info["iters"], "optima_converged": info["converged"]}


def _requad(T: Tensor, H: Tensor, mask: Tensor, init: Tensor, H_inv: Tensor | None, tol: float, max_iters: int,
            dtype: torch.dtype) -> tuple[Tensor, dict[str, Any]]:
    """The exact QP of T [d_out, d_in] on a fixed mask (batched PCG from ``init``), float64 with exact zeros off it."""
    S, info = batched(T.double(), H, mask, tol, max_iters, dtype, init=init.double(),
                      precond="hinv" if H_inv is not None else "jacobi", H_inv=H_inv)
    S = torch.where(mask, S.double(), torch.zeros((), dtype=torch.float64, device=S.device))
    return S, {"requad_iters": info["iters"]}


@dataclass
class GramSLRResult:
    """What :func:`gram_slr` returns (float64, W's device)."""

    sparse: Tensor  # [d_out, d_in], exact zeros off the mask
    U: Tensor  # [d_out, r]
    V: Tensor  # [r, d_in]
    mask: Tensor  # [d_out, d_in] bool, True = kept
    objective: list[float]  # sqrt(f / tr(W H W^T)) after each iteration (non-increasing)
    rejected: int = 0  # sparse steps that would have increased f (previous S kept)
    stopped_early: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)  # per-iteration facts of the sparse step


@torch.no_grad()
def gram_slr(
    weight: Tensor,
    H: Tensor,
    rank: int,
    keep_per_row: int,
    nm: tuple[int, int] | None = None,
    iters: int = DEFAULT_ITERS,
    sparse_step_method: str = "optima",
    blocksize: int = 128,
    optima_tol: float = 1e-6,
    optima_max_iters: int = 500,
    optima_dtype: torch.dtype = torch.float32,
    init: str = "sparse",
    solver: str = "fast",
    inner_iters: int = DEFAULT_INNER_ITERS,
    chol: Tensor | None = None,
    precond_rank: int = DEFAULT_PRECOND_RANK,
) -> GramSLRResult:
    """Alternating minimisation of tr((W - S - UV) H (W - S - UV)^T) (see the module docstring).

    weight [d_out, d_in]; H [d_in, d_in] positive definite (dampened); rank r; keep_per_row k (ignored
    with ``nm`` = (N, M)); init 'sparse' (L = 0) or 'lowrank' (S = 0). Returns float64 factors with
    W ~= sparse + U @ V.

    solver 'exact' (the reference): every sparse step's QP solved to ``optima_tol`` (at most
    ``optima_max_iters`` CG steps), every low-rank step by a float64 thin SVD. solver 'fast': the same
    alternation with inexact inner solves, each checked against the objective (see :func:`_fast_loop`);
    ``inner_iters`` caps its CG steps per sparse step. With rank 0 (a single sparse step) both are the
    exact path. ``chol``: H's lower Cholesky factor (float64) where the caller has it already (dampening
    computes it), saving one factorisation.
    """
    if iters < 1:
        raise ValueError(f"gram_slr_iters must be >= 1, got {iters}")
    if solver not in SOLVERS:
        raise ValueError(f"gram_slr solver (config key 'gram_slr_solver') {solver!r}; allowed: {SOLVERS}")
    if init not in INITS:
        raise ValueError(f"gram_slr start (config key 'gram_slr_init') {init!r}; allowed: {INITS}")
    W = weight.double()
    Hd = H.to(W.device, torch.float64)
    d_out, d_in = W.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must lie in [0, {min(d_out, d_in)}]")
    C = torch.linalg.cholesky(Hd) if chol is None else chol.to(W.device, torch.float64)
    if solver == "fast" and rank > 0:
        return _fast_loop(W, Hd, C, rank, keep_per_row, nm, iters, sparse_step_method, blocksize, optima_tol,
                          optima_max_iters, optima_dtype, init, inner_iters, precond_rank)
    f0 = max(gram_objective(W, Hd), 1e-300)
    sqrt_h = SqrtH.of(Hd) if rank > 0 else None
    H_inv = torch.cholesky_inverse(C)
    if init == "lowrank" or rank == 0:  # S = 0: L starts as the reduced-rank regression of W itself
        U, V = lowrank_step(W, sqrt_h, rank)
    else:  # L = 0: iteration 0's sparse step sees W itself
        U, V = W.new_zeros(d_out, rank), W.new_zeros(rank, d_in)
    L = U @ V
    S: Tensor | None = None
    mask: Tensor | None = None
    f = math.inf
    objective: list[float] = []
    steps: list[dict[str, Any]] = []
    rejected, stopped = 0, False
    for it in range(iters if rank > 0 else 1):
        S_new, mask_new, info = sparse_step(W - L, Hd, keep_per_row, nm, sparse_step_method, blocksize, H_inv, S,
                                            optima_tol, optima_max_iters, optima_dtype)
        f_new = gram_objective(W - L - S_new, Hd)
        steps.append(info)
        if S is not None and f_new > f:
            # a new mask that raises f: re-solve the previous mask's kept weights exactly instead (the QP
            # on a fixed mask; the previous S is feasible for it, so this cannot raise f beyond rounding)
            rejected += 1
            S_new, info = _requad(W - L, Hd, mask, S, H_inv, optima_tol, optima_max_iters, optima_dtype)
            mask_new = mask
            f_new = gram_objective(W - L - S_new, Hd)
            steps[-1] = {**steps[-1], **info, "rejected": True}
            if f_new >= f * (1 - 1e-12):  # no progress left: every later step would repeat this one
                stopped = True
                log.debug("gram_slr: no progress at iteration %d (objective %.6g); stopping", it, f)
                break
        S, mask, f = S_new, mask_new, f_new
        if rank > 0:
            U, V = lowrank_step(W - S, sqrt_h, rank)
            L = U @ V
            f = gram_objective(W - S - L, Hd)
        objective.append(math.sqrt(max(f, 0.0) / f0))
    assert S is not None and mask is not None
    return GramSLRResult(S, U, V, mask, objective, rejected, stopped, steps)


def _fast_loop(
    W: Tensor,
    Hd: Tensor,
    C: Tensor,
    rank: int,
    keep_per_row: int,
    nm: tuple[int, int] | None,
    iters: int,
    sparse_step_method: str,
    blocksize: int,
    optima_tol: float,
    optima_max_iters: int,
    optima_dtype: torch.dtype,
    init: str,
    inner_iters: int,
    precond_rank: int,
) -> GramSLRResult:
    """The alternation of :func:`gram_slr` with inexact inner solves; W [d_out, d_in], Hd [d_in, d_in] float64
    with its lower Cholesky factor C, rank > 0.

    Where it departs from the exact path, and why the objective still never increases:

    * The objective is kept in the coordinates of the Cholesky factor ``H = C C^T`` (C lower triangular;
      the exact path's ``H^{1/2}`` serves the same purpose but needs an eigendecomposition, 1.1 s for
      d_in = 1536 against 0.05 s): ``M = (W - S) C`` (one product per iteration, :func:`lower_matmul`,
      which skips C's zero half; ``W C`` formed once in float64) and ``L C = P diag(sigma) Z^T`` (rank r),
      ``f = ||M - L C||_F^2`` (in float64, by its expansion, one thin product, see ``obj``). The low-rank step
      in these coordinates is still the reduced-rank regression ``L = [best rank-r of (W - S) C] C^{-1}``
      (the same minimiser: the objective is the same function of L). M's product is float32 (S is the
      CG's float32 iterate) away from an exact fit, and every comparison of f values that its rounding
      could decide is redone from float64 M's (``F32_M_FLOOR``, ``F32_M_MARGIN``), so every accept/reject
      below is decided on exact float64 values; the record's last value is the returned iterate's float64 f.
    * Sparse step ('optima'): the same Wanda-style mask of ``W - L`` (scored in ``optima_dtype``; the
      k-per-row cut warm-started from the previous iteration's, as in OATS's thresholding), its QP
      gets at most ``inner_iters`` CG steps (:func:`masked_cg`, in ``optima_dtype``, preconditioned by
      :class:`Deflation`, moved to each new mask by the entries that changed) from the previous S (zero on
      entries new to the mask). The start's product
      ``S H`` is the previous solve's, carried along its steps, less the entries that left the mask
      (``sparse_lowrank.masked_cg.without_entries``, a sparse product), so a sparse step costs one ``[d_out, d_in] @
      [d_in, d_in]`` product per CG step and none for its start. The solve stops earlier at the tolerance
      ``max(optima_tol, min(INNER_TOL_MAX, INNER_TOL_FACTOR sqrt(delta)))``, delta the relative decrease
      of f in the previous outer iteration (the solves tighten as the loop converges); the first one
      starts from ``W - L`` masked. 'sparsegpt' proposals are the exact path's (the OBS
      sweep is not iterative), refused as there when the sparse step itself raises f.
    * Objective check, per outer iteration (sparse step then low-rank step): if f ends above the
      previous iteration's, the proposal's QP is solved further, ``inner_iters`` steps at a time, until
      the iteration descends or the QP reaches ``optima_tol`` (the exact path's proposal); if f is still
      higher, the previous mask is re-solved from the previous S (CG from a feasible point) as on the
      exact path, and if even that does not lower f the previous iterate is kept and the loop stops
      (``stopped_early``). The exact path checks after the sparse step instead; checking after the
      low-rank step accepts a proposal that the following exact-or-better low-rank step brings below
      the previous f, which keeps the recorded objective non-increasing at fewer CG steps.
    * Low-rank step: OATS's warm-started subspace iteration (``sparse_lowrank.decompose``, ``svd_tol``
      ``SVD_TOL``, r + 8 vectors) on M (on the float32 M where it is one; its factors' f still in float64)
      instead of a full SVD. The exact step is the best rank
      r; this one is the best rank r within the subspace found, which contains the current L's row
      space, so it cannot raise f but by rounding. It is checked where the iteration would not
      descend: if f is then above the current L's on the same M, the full float64 SVD of M is taken.
    """
    d_out, d_in = W.shape
    f0 = max(gram_objective(W, Hd), 1e-300)

    def right_inv(B: Tensor, factor: Tensor = C) -> Tensor:
        """B [r, d_in] -> B C^{-1} (``factor``: C or its optima_dtype copy)."""
        return torch.linalg.solve_triangular(factor, B, upper=False, left=False)

    def coords(S: Tensor, Sw: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """M = (W - S) C [d_out, d_in] in float64 from a float64 product; or, given ``Sw`` (S in float32),
        from a float32 one, returned in float32 too (see ``F32_M_FLOOR``)."""
        if Sw is None:
            return WC - lower_matmul(S, C), None
        M32 = WCs - lower_matmul(Sw, Cs)
        return M32.double(), M32

    WC = lower_matmul(W, C)
    # the sparse step's arithmetic (targets, mask scores, CG) in optima_dtype; M and f in float64
    wd = optima_dtype
    Hs, Ws, WHs, Cs, WCs = Hd.to(wd), W.to(wd), (W @ Hd).to(wd), C.to(wd), WC.to(wd)
    lowrank = _LowRank(rank, "fast", None, SVD_TOL, 8)
    # the Wanda-style mask, warm-started from the previous cut as in OATS's thresholding (a top-k set, as keep_topk_rows's)
    threshold = _RowThreshold(keep_per_row) if nm is None else None
    col_scale = torch.diagonal(Hd).clamp(min=0).sqrt().to(wd)
    defl = Deflation.of(Hd, precond_rank, wd) if precond_rank > 0 else None
    z = W.new_zeros(())

    def lr_step(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """M [d_out, d_in] -> (P sigma [d_out, r], Z^T [r, d_in], sigma [r]) as float64 tensors: rank-r
        approximation factors of M, computed in M's dtype (float32 or float64; the warm start follows it)."""
        if lowrank.Vh is not None:
            lowrank.Vh = lowrank.Vh.to(M.dtype)
        Ur, sr, Vh = lowrank(M.unsqueeze(0))
        return (Ur[0] * sr[0]).double(), Vh[0].double(), sr[0].double()

    def exact_lr(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        P, sig, Zt = torch.linalg.svd(M, full_matrices=False)
        lowrank.Vh = Zt[: lowrank.Vh.shape[-2]].unsqueeze(0) if lowrank.Vh is not None else None
        return P[:, :rank] * sig[:rank], Zt[:rank], sig[:rank]

    def obj(M: Tensor, A: Tensor, B: Tensor, m2: float) -> float:
        """||M - A B||_F^2 (m2 = ||M||_F^2).

        As ||M||^2 - 2 <A, M B^T> + <A^T A, B B^T>: one thin product and no [d_out, d_in] temporary. Its
        rounding error is of order eps ||M||^2, so where f is below OBJ_EXPANSION_FLOOR ||M||^2 (a nearly
        exact fit) it is recomputed directly, keeping every comparison and the record accurate to ~1e-11.
        """
        f = m2 - 2 * float((A * (M @ B.T)).sum()) + float(((A.T @ A) * (B @ B.T)).sum())
        if f < OBJ_EXPANSION_FLOOR * m2:
            f = float((M - A @ B).square().sum())
        return f

    # the rank-r part is carried as L C = A B (A = P sigma [d_out, r], B = Z^T [r, d_in])
    if init == "lowrank":
        A, B, sig = lr_step(WC)
    else:
        A, B, sig = W.new_zeros(d_out, rank), W.new_zeros(rank, d_in), W.new_zeros(rank)
    S: Tensor | None = None  # float64, zero off the mask (-0.0 possible until the end)
    Sw: Tensor | None = None  # S in optima_dtype (the CG's own iterate)
    SH: Tensor | None = None  # S @ H in optima_dtype, carried from the CG that produced S
    M: Tensor | None = None
    pc: MaskedDeflation | None = None  # the preconditioner on the current mask
    mask: Tensor | None = None
    f = math.inf
    f_exact = True  # f came from a float64 M
    f_share = 0.0  # f / ||M||^2 of the current iterate
    objective: list[float] = []
    steps: list[dict[str, Any]] = []
    rejected, stopped, lr_fallbacks, f32_settled = 0, False, 0, 0
    delta = 1.0  # relative decrease of f in the previous outer iteration

    def cg(TH: Tensor, m: Tensor, start: Tensor, start_h: Tensor | None, tol: float, n: int,
           pc: MaskedDeflation | None) -> tuple[Tensor, Tensor, int, Tensor]:
        """(S float64, S in optima_dtype, CG steps, S @ H): X is exactly zero off the mask already."""
        X, steps, XH = masked_cg(TH, Hs, m, start, tol, n, start_h, pc)
        return X.double(), X, steps, XH

    def lowrank_after(M: Tensor, bound: float, M32: Tensor | None) -> tuple[Tensor, Tensor, Tensor, float, float]:
        """The low-rank step on M = (W - S) C: (A, B, sigma, f, ||M||^2), f never above f with the current L.

        The subspace iteration runs on ``M32`` where given (M from a float32 product): its factors are then
        float32-accurate, and f is still computed for them exactly, in float64, on M.

        The subspace iteration's answer stands when f is at most ``bound`` (the previous iteration's
        f: the iteration descends either way); only above it is it compared with the current L's f on
        this M, and replaced by the exact step where it is worse (it cannot be in exact arithmetic: the
        warm-start subspace contains the current L's row space).
        """
        nonlocal lr_fallbacks
        m2 = float(torch.linalg.vector_norm(M).square())
        A_new, B_new, sig_new = lr_step(M if M32 is None else M32)
        f_lr = obj(M, A_new, B_new, m2)
        if f_lr > bound and f_lr > obj(M, A, B, m2):  # the subspace missed: the exact step (cannot raise f)
            lr_fallbacks += 1
            A_new, B_new, sig_new = exact_lr(M)
            f_lr = obj(M, A_new, B_new, m2)
        return A_new, B_new, sig_new, f_lr, m2

    def settled(S_new: Tensor, A_new: Tensor, B_new: Tensor, f_new: float, fast: bool) -> tuple[float, bool]:
        """(f_new, whether it is from a float64 M): where a float32 M leaves f_new within F32_M_MARGIN of f,
        both are recomputed from float64 M's, so that the comparison between them is exact."""
        nonlocal f, f_exact, f32_settled
        if not fast or not math.isfinite(f) or abs(f_new - f) > F32_M_MARGIN * f:
            return f_new, not fast
        f32_settled += 1
        if not f_exact:
            M_prev, _ = coords(S)
            f, f_exact = obj(M_prev, A, B, float(torch.linalg.vector_norm(M_prev).square())), True
        M_x, _ = coords(S_new)
        return obj(M_x, A_new, B_new, float(torch.linalg.vector_norm(M_x).square())), True

    def evaluate(S_new: Tensor, Sw_new: Tensor, fast: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float, bool]:
        """A sparse-step proposal's M, the low-rank step on it and its settled f: (M, A, B, sigma, f, ||M||^2, f exact)."""
        M_new, M32_new = coords(S_new, Sw_new if fast else None)
        A_new, B_new, sig_new, f_new, m2_new = lowrank_after(M_new, f, M32_new)
        f_new, fn_exact = settled(S_new, A_new, B_new, f_new, fast)
        return M_new, A_new, B_new, sig_new, f_new, m2_new, fn_exact

    for it in range(iters):
        Aw, Bw = A.to(wd), B.to(wd)
        T = Ws - Aw @ right_inv(Bw, Cs)  # W - L, with L = A B C^{-1}
        TH = WHs - Aw @ (Bw @ Cs.T)  # (W - L) H, with L H = A B C^T
        tol = max(optima_tol, min(INNER_TOL_MAX, INNER_TOL_FACTOR * math.sqrt(max(delta, 0.0))))
        info: dict[str, Any] = {"inner_tol": tol}
        fast = wd == torch.float32 and sparse_step_method == "optima" and f_share >= F32_M_FLOOR
        if sparse_step_method == "optima":
            mask_new = threshold.mask(T * col_scale) > 0 if threshold is not None else wanda_gram_mask(T, Hd, keep_per_row, nm)
            pc_new = defl.at(mask_new, pc) if defl is not None else None
            S_new, Sw_new, n_cg, SH_new = cg(TH, mask_new, T if Sw is None else Sw, SH, tol, inner_iters, pc_new)
            info["optima_iters"] = n_cg
        else:
            S_new, mask_new, sinfo = sparse_step(W - A @ right_inv(B), Hd, keep_per_row, nm, "sparsegpt", blocksize)
            Sw_new, SH_new = S_new.to(wd), None
            pc_new = defl.at(mask_new, pc) if defl is not None else None
            info.update(sinfo)
        M_new, M32_new = coords(S_new, Sw_new if fast else None)
        # a SparseGPT proposal is refused as on the exact path, when the sparse step itself raises f
        refuse = sparse_step_method == "sparsegpt" and S is not None and obj(M_new, A, B, float(torch.linalg.vector_norm(M_new).square())) > f
        if not refuse:
            A_new, B_new, sig_new, f_new, m2_new = lowrank_after(M_new, f, M32_new)
            f_new, fn_exact = settled(S_new, A_new, B_new, f_new, fast)
        if S is not None and not refuse and f_new > f and sparse_step_method == "optima":
            # tighter: more CG steps on the same mask, a chunk at a time, until the iteration descends
            # or the QP is solved to optima_tol (the exact path's proposal)
            spent, converged = 0, False
            while f_new > f and not converged and spent < optima_max_iters:
                S_new, Sw_new, n_cg, SH_new = cg(TH, mask_new, Sw_new, SH_new, optima_tol, inner_iters, pc_new)
                spent, converged = spent + n_cg, n_cg < inner_iters
                M_new, A_new, B_new, sig_new, f_new, m2_new, fn_exact = evaluate(S_new, Sw_new, fast)
            info["tightened_iters"] = spent
        if S is not None and (refuse or f_new > f):
            # the new mask raises f even so: re-solve the previous mask from the previous S instead
            # (CG from a feasible point: f cannot rise but by rounding, which the check below catches)
            rejected += 1
            assert mask is not None and M is not None
            S_new, Sw_new, n_cg, SH_new = cg(TH, mask, Sw, SH, tol, inner_iters, pc)
            mask_new, pc_new = mask, pc
            M_new, A_new, B_new, sig_new, f_new, m2_new, fn_exact = evaluate(S_new, Sw_new, fast)
            info.update(requad_iters=n_cg, rejected=True)
            steps.append(info)
            if f_new >= f * (1 - 1e-12):  # no progress left (or rounding): keep the previous iterate and stop
                stopped = True
                log.debug("gram_slr: no progress at iteration %d (objective %.6g); stopping", it, f)
                break
        else:
            steps.append(info)
        S, Sw, SH, M, mask, pc = S_new, Sw_new, SH_new, M_new, mask_new, pc_new
        A, B, sig = A_new, B_new, sig_new
        delta = (f - f_new) / f_new if math.isfinite(f) and f_new > 0 else 1.0
        f, f_exact, f_share = f_new, fn_exact, f_new / max(m2_new, 1e-300)
        objective.append(math.sqrt(max(f, 0.0) / f0))
    assert S is not None and mask is not None
    if not f_exact:  # the record ends on the returned iterate's objective from a float64 M
        M, _ = coords(S)
        objective[-1] = math.sqrt(max(obj(M, A, B, float(torch.linalg.vector_norm(M).square())), 0.0) / f0)
    S = torch.where(mask, S, z)  # exact (positive) zeros off the mask
    root = sig.clamp(min=0).sqrt()
    inv_root = torch.where(root > 0, 1 / root.clamp(min=1e-300), z)
    U = A * inv_root  # P sigma^{1/2}
    V = right_inv(root[:, None] * B)
    if steps:
        steps[-1].update(lowrank_fallbacks=lr_fallbacks, f32_settled=f32_settled)
    return GramSLRResult(S, U, V, mask, objective, rejected, stopped, steps)


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    """W [d_out, d_in] -> S (exact zeros, ``mask``), U [d_out, r], V [r, d_in] with W ~= S + U V, at the OATS budget.

    Config keys: rank_ratio, gram_slr_iters, gram_slr_sparse_step, gram_slr_init, gram_slr_solver,
    gram_slr_inner_iters, percdamp, blocksize, optima_tol, optima_max_iters, optima_dtype (sparse step 'optima'). ``info`` mirrors the ``oats`` method's
    (rank, nonzeros, keep_per_row, kept_params, achieved_compression, target_compression,
    lowrank_share) plus the relative objective sqrt(f / tr(W H W^T)) after the first and last iteration.
    """
    if stats is None or stats.gram is None:
        raise ValueError("gram_slr needs the Gram matrix of its inputs (the registry asks the pipeline for stats='gram')")
    d_out, d_in = weight.shape
    b = oats_budget(d_out, d_in, budget.sparsity, KEYS.value(cfg, "rank_ratio"), budget.nm)
    method = str(KEYS.value(cfg, "gram_slr_sparse_step"))
    if method not in SPARSE_STEPS:
        raise ValueError(f"config key 'gram_slr_sparse_step': got {method!r}; allowed values: {', '.join(map(repr, SPARSE_STEPS))}")
    Hd, chol, lam, raises = dampen(stats.gram.to(weight.device), float(KEYS.value(cfg, "percdamp")), torch.float64)
    res = gram_slr(
        weight, Hd, b.rank, b.keep_per_row, b.nm,
        iters=int(KEYS.value(cfg, "gram_slr_iters")),
        sparse_step_method=method,
        blocksize=int(KEYS.value(cfg, "blocksize")),
        optima_tol=float(KEYS.value(cfg, "optima_tol")),
        optima_max_iters=int(KEYS.value(cfg, "optima_max_iters")),
        optima_dtype=torch.float64 if KEYS.value(cfg, "optima_dtype") == "float64" else torch.float32,
        init=str(KEYS.value(cfg, "gram_slr_init")),
        solver=str(KEYS.value(cfg, "gram_slr_solver")),
        inner_iters=int(KEYS.value(cfg, "gram_slr_inner_iters")),
        chol=chol,
        precond_rank=int(KEYS.value(cfg, "gram_slr_precond_rank")),
    )
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    info = {
        **budget_info(b, int(res.mask.sum()), budget.sparsity),
        "gram_slr_sparse_step": method,
        "gram_slr_init": str(KEYS.value(cfg, "gram_slr_init")),
        "gram_slr_solver": str(KEYS.value(cfg, "gram_slr_solver")),
        "gram_slr_iters_run": len(res.objective),
        "gram_slr_objective_first": res.objective[0],
        "gram_slr_objective": res.objective[-1],
        "gram_slr_rejected_steps": res.rejected,
        "gram_slr_stopped_early": res.stopped_early,
        "damp": lam,
        "damp_raised": raises,
    }
    return CompressedWeight(sparse=res.sparse.to(out_dtype), U=res.U.to(out_dtype), V=res.V.to(out_dtype), mask=res.mask, info=info)


METHOD = Method(
    "gram_slr", compress_weight, stats="gram", keys=KEYS, lowrank=True, validate=validate,
    build_module=build_module,
    workspace=lambda d_out, d_in, cfg: 6 * d_in * d_in * 8 + 6 * d_out * d_in * 8,  # H, sqrt H, its inverse (float64); W, S, L, residuals
    doc="full-Gram sparse + low-rank at the OATS budget: alternates a sparse step (OBS sweep or mask + QP) and the "
        "closed-form reduced-rank regression on `tr((W - S - L) H (W - S - L)ᵀ)`",
    paper="HASSLE-free (Makni et al., CPAL 2025); 3BASiL (Makni et al., NeurIPS 2025)",
    label=lambda cfg: f"full-Gram S+L (κ={KEYS.value(cfg, 'rank_ratio'):g}, {KEYS.value(cfg, 'gram_slr_sparse_step')})",
)

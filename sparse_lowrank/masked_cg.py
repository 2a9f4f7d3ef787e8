"""Batched masked least squares on a Gram matrix: every row's QP ``min (x - t)^T H (x - t)``, x zero off the
row's mask, by preconditioned conjugate gradients, and the products that make it cheap to repeat.

Used by gram_slr's fast solver (``sparse_lowrank.gram_slr``), which re-solves these QPs every outer
iteration on a slightly different mask: :func:`masked_cg` carries ``X H`` along its steps so the next solve
starts without a product (:func:`without_entries` takes out the entries that left the mask),
:class:`Deflation` preconditions it with the Gram's top correlation directions per row's mask, and
:func:`lower_matmul` multiplies by a lower-triangular factor at about half a dense product's cost. Pure
functions of tensors: no model, file or device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class MaskedCG(NamedTuple):
    """What :func:`masked_cg` returns."""

    X: Tensor  # [d_out, d_in] the solution, exact zeros off the mask
    steps: int  # CG steps taken
    XH: Tensor  # [d_out, d_in] X @ H, carried along the iteration (no product of its own)


def lower_matmul(X: Tensor, C: Tensor, block: int = 256) -> Tensor:
    """X [m, n] @ C [n, n] for a lower-triangular C, block column by block column, skipping C's zero blocks.

    Column block j of the product only involves C's rows from j's first column on, so about half the
    flops of a dense product (``block`` = 256 on n = 1536: 58%); the same product up to rounding. Built
    as the transpose ``C^T X^T``, whose row blocks are contiguous (written in place, no copies), and
    returned as a [m, n] view of it.
    """
    n = C.shape[0]
    out_t = X.new_empty(n, X.shape[0])
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        torch.mm(C[j0:, j0:j1].T, X[:, j0:].T, out=out_t[j0:j1])
    return out_t.T


# entries that leave the mask are taken out of a carried product by a sparse (COO) product while they
# are fewer than this share of the matrix; beyond it one dense product is cheaper. Measured on one core
# (D [576, 1536] @ H [1536, 1536], float32): dense 30 ms; COO 4 ms at 3,000 nonzeros, 20 ms at 55,000,
# 26 ms at 110,000, 44 ms at 220,000. Between gram_slr's outer iterations 1,000-17,000 entries of
# SmolLM2's 885,000 leave the mask, fewer as it converges.
_SPARSE_UPDATE_SHARE = 1 / 10


def without_entries(XH: Tensor, D: Tensor, H: Tensor) -> Tensor:
    """(X - D) @ H from XH = X @ H [d_out, d_in] and a mostly-zero D [d_out, d_in]: XH - D @ H.

    D @ H as a sparse product over D's nonzeros (a dense one when they are many).
    """
    nnz = int(torch.count_nonzero(D))
    if nnz == 0:
        return XH
    if nnz > _SPARSE_UPDATE_SHARE * D.numel():
        return XH - D @ H
    return XH - torch.sparse.mm(D.to_sparse(), H)


def top_eigenpairs(A: Tensor, k: int, oversample: int = 8, power_steps: int = 3) -> tuple[Tensor, Tensor]:
    """Approximate top-k eigenpairs of a symmetric positive semidefinite A [n, n], k < n: (lam [k] descending,
    V [n, k] orthonormal columns), by seeded randomised subspace iteration (a few [n, n] @ [n, k + oversample]
    products: milliseconds where a full eigendecomposition of n = 1536 takes a second)."""
    n = A.shape[0]
    g = torch.Generator(A.device).manual_seed(0)
    Q = torch.linalg.qr(A @ torch.randn(n, min(n, k + oversample), generator=g, dtype=A.dtype, device=A.device)).Q
    for _ in range(power_steps):
        Q = torch.linalg.qr(A @ Q).Q
    lam, Z = torch.linalg.eigh(Q.T @ A @ Q)
    return lam.flip(0)[:k], (Q @ Z).flip(1)[:, :k]


@dataclass
class Deflation:
    """A preconditioner for :func:`masked_cg`: Jacobi with the Gram's top correlation directions taken out.

    With D = diag H, the correlation matrix ``R = D^{-1/2} H D^{-1/2}`` is approximated by ``I + V diag(lam - 1) V^T``
    (V [d_in, k] its top eigenvectors, lam > 1 their eigenvalues), so each row's masked system H_KK by
    ``D_K^{1/2} (I + V_K diag(lam - 1) V_K^T) D_K^{1/2}`` (V_K: V's rows on the row's mask K), whose inverse is applied
    by Woodbury: ``z = D^{-1/2} (y - V_K G^{-1} V_K^T y)``, ``y = D^{-1/2} r``, ``G = diag(1 / (lam - 1)) + V_K^T V_K``
    [k, k] per row. It is symmetric positive definite for any orthonormal V and lam > 1, so the CG is a PCG whatever
    the quality of V; k = 0 is Jacobi. On SmolLM2 Grams R's spectrum is spread (top eigenvalues 14-130, the 32nd
    2.4-3.9, the smallest 0.01-0.15), and with the top directions taken out two CG steps reach about what four
    Jacobi steps reach (``sparse_lowrank.gram_slr.DEFAULT_PRECOND_RANK``). The per-row Gram ``V_K^T V_K`` costs a [d_out, d_in] @
    [d_in, k^2] product for a new mask, and a sparse one over the changed entries when moved (``at``).
    """

    dis: Tensor  # D^{-1/2} [d_in]
    V: Tensor  # [d_in, k]
    shift: Tensor  # 1 / (lam - 1) [k]
    VV: Tensor  # [d_in, k * k], row j the flattened v_j v_j^T (v_j: V's row j)
    dinv: Tensor  # 1 / diag H [d_in]
    Vd: Tensor  # D^{-1/2} V [d_in, k]

    @classmethod
    def of(cls, H: Tensor, k: int, dtype: torch.dtype, min_eig: float = 1.5) -> "Deflation | None":
        """From H [d_in, d_in] (float64): the top k correlation directions, those with eigenvalue >= min_eig;
        None where there is none (uncorrelated inputs: plain Jacobi is then the same preconditioner)."""
        dis = torch.diagonal(H).clamp_min(torch.finfo(H.dtype).tiny).rsqrt()
        lam, V = top_eigenpairs(H * dis[:, None] * dis[None, :], min(k, H.shape[0] - 1))
        keep = lam >= min_eig
        if not bool(keep.any()):
            return None
        lam, V = lam[keep], V[:, keep]
        VV = (V[:, :, None] * V[:, None, :]).reshape(V.shape[0], -1)
        return cls(dis.to(dtype), V.to(dtype), (1 / (lam - 1)).to(dtype), VV.to(dtype), dis.square().to(dtype),
                   (dis[:, None] * V).to(dtype))

    def at(self, mask: Tensor, base: "MaskedDeflation | None" = None) -> "MaskedDeflation":
        """The preconditioner for one mask [d_out, d_in]; from ``base`` (another mask's) by the entries that changed."""
        m = mask.to(self.V.dtype)
        if base is None:
            G = m @ self.VV
        else:  # G_new = G + (m_new - m_old) @ VV, a sparse product while few entries changed
            G = without_entries(base.G, base.m - m, self.VV)
        k = self.V.shape[1]
        Ginv = torch.cholesky_inverse(torch.linalg.cholesky(torch.diag(self.shift) + G.view(G.shape[0], k, k)))
        return MaskedDeflation(self, m, m * self.dis, G, Ginv)


class MaskedDeflation(NamedTuple):
    """:class:`Deflation` on one mask: callable on a residual R [d_out, d_in] (zero off the mask), returns the same shape."""

    defl: Deflation
    m: Tensor  # [d_out, d_in] the mask in the preconditioner's dtype
    md: Tensor  # the mask times D^{-1/2} [d_out, d_in]
    G: Tensor  # [d_out, k * k]: V_K^T V_K per row, flattened
    Ginv: Tensor  # [d_out, k, k]: (diag(1 / (lam - 1)) + V_K^T V_K)^{-1}

    def __call__(self, R: Tensor) -> Tensor:
        d = self.defl
        # z = D^{-1/2} (y - V_K G^{-1} V_K^T y), y = D^{-1/2} R; R is zero off the mask, so V_K^T y = R D^{-1/2} V
        c = torch.bmm(self.Ginv, (R @ d.Vd).unsqueeze(-1)).squeeze(-1)
        return (R * d.dinv).addcmul_(self.md, c @ d.V.T, value=-1)


def masked_cg(TH: Tensor, H: Tensor, mask: Tensor, X0: Tensor, tol: float, max_iters: int,
              X0H: Tensor | None = None, precond: MaskedDeflation | None = None) -> MaskedCG:
    """Preconditioned CG on every row's QP ``min (x - t)^T H (x - t)`` with x zero off the row's mask.

    TH [d_out, d_in]: the targets times H, ``T H``; H [d_in, d_in] symmetric positive definite; mask
    [d_out, d_in] bool (True = free); X0 [d_out, d_in] the start (off-mask entries ignored); X0H
    [d_out, d_in] optionally ``X0 @ H`` (X0 before masking), e.g. the ``XH`` of the previous solve, which
    saves the start's product (the entries of X0 off the mask are taken out by :func:`without_entries`).
    ``precond``: :meth:`Deflation.at` this mask, in TH's dtype; None = Jacobi (``1 / diag H``).
    Arithmetic in TH's dtype. Stops once every row's residual ``||(T H - X H)_K||`` is at most ``tol ||(T H)_K||``, or
    after ``max_iters`` steps of one ``[d_out, d_in] @ [d_in, d_in]`` product each. From a feasible start
    every step lowers each row's objective (CG minimises it over a growing Krylov space), up to rounding.
    Returns (X with exact zeros off the mask, steps taken, X @ H).
    """
    if precond is not None and precond.m.dtype == TH.dtype:
        m, apply = precond.m, precond  # the mask as the preconditioner already holds it
    else:
        m = mask.to(TH.dtype)
        dinv = 1.0 / torch.diagonal(H).clamp_min(torch.finfo(H.dtype).tiny)
        apply = precond if precond is not None else (lambda R: R * dinv)
    X0 = X0.to(TH.dtype)
    X = m * X0
    if X0H is None:
        XH = X @ H
    else:
        XH = without_entries(X0H.to(TH.dtype), X0 - X, H)
    # R, Z and P stay zero off the mask, so P H needs no masking where it meets P (p^T H p) and R is
    # re-masked in place after each update (fewer full passes over [d_out, d_in] than masked copies)
    R = (TH - XH).mul_(m)
    scale = torch.linalg.vector_norm(m * TH, dim=1).clamp_min(torch.finfo(TH.dtype).tiny)
    P = apply(R)
    rz = torch.linalg.vecdot(R, P)
    zero = torch.zeros((), dtype=TH.dtype, device=TH.device)
    for step in range(max_iters):
        if bool((torch.linalg.vector_norm(R, dim=1) <= tol * scale).all()):
            return MaskedCG(X, step, XH)
        PH = P @ H
        pAp = torch.linalg.vecdot(P, PH)
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, 1.0), zero)[:, None]
        X.addcmul_(alpha, P)
        XH.addcmul_(alpha, PH)
        R.addcmul_(alpha, PH, value=-1).mul_(m)
        Z = apply(R)
        rz_new = torch.linalg.vecdot(R, Z)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), zero)
        P = Z.addcmul_(beta[:, None], P)
        rz = rz_new
    return MaskedCG(X, max_iters, XH)

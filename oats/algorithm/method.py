"""The registered ``oats`` method: budget split, alternating thresholding, factors for the pipeline.

Its keys: ``rank_ratio`` (kappa), ``num_iters``, ``svd`` ('fast' | 'exact'), ``svd_tol``, ``compress``;
it reads the common ``sparsity`` (the compression rate rho) and ``sparsity_type`` through the budget.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping

from torch import Tensor, nn

from oats.algorithm.decompose import SVD_TOL, OatsBudget, decompose, oats_budget
from oats.interface import Budget, CompressedWeight, InputStats, Method
from oats.keys import ConfigError, Key, choice, interval, parse_nm, positive

KEYS: dict[str, Key] = {
    "rank_ratio": Key(0.3, (float, int), "OATS kappa: share of the kept parameters given to the low-rank part", interval(0.0, 1.0)),
    "num_iters": Key(80, (int,), "OATS alternating-thresholding iterations (paper: 80)", positive),
    "svd": Key("fast", (str,), "OATS low-rank step: `fast` (warm-started subspace iteration) or `exact` (full SVD each iteration)", choice("fast", "exact")),
    "svd_tol": Key(SVD_TOL, (float,), "OATS `svd: fast`: subspace iteration stops once the top-r Ritz residual is below this fraction of the rank-r error", interval(0.0, 1.0, lo_closed=False)),
    "compress": Key(False, (bool,), "OATS: replace linears by sparse + low-rank modules (True) or sum S + UV into dense weights (False)"),
    "forward": Key("auto", (str,), "compress mode: how a SparseLowRankLinear computes, `auto` (the fastest measured per device, dtype, shape, density and rows) or one of `dense_merged`, `torch_csr`, `bitmask_kernel`, `dense_kernel`, `densify`; the record says which ran", choice("auto", "dense_merged", "torch_csr", "bitmask_kernel", "dense_kernel", "densify"), result=False),
}

# defaults when no config is given: the keys' own, so the two cannot drift apart
DEFAULTS = {k: spec.default for k, spec in KEYS.items()}


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return DEFAULTS[key]
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return DEFAULTS[key] if value is None else value


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


def compress_weight(weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any = None) -> CompressedWeight:
    """W [d_out, d_in] -> factors S [d_out, d_in] (exact zeros), U [d_out, r], V [r, d_in] with W ~ S + U V.

    ``info``: rank, nonzeros, kept_params, achieved_compression (exact), target compression, keep_per_row,
    final scaled objective, and the fast path's mean subspace-iteration steps per iteration.
    """
    if stats is None:
        raise ValueError("oats needs the inputs' second moments (stats='diag')")
    d_out, d_in = weight.shape
    b = oats_budget(d_out, d_in, budget.sparsity, _get(cfg, "rank_ratio"), budget.nm)
    res = decompose(weight, stats.second_moment, b.rank, b.keep_per_row, int(_get(cfg, "num_iters")), b.nm, svd=_get(cfg, "svd"),
                    tol=float(_get(cfg, "svd_tol")), track_objective=False)
    info = {
        **budget_info(b, int((res.sparse != 0).sum()), budget.sparsity),
        "oats_objective": res.objective[-1] if res.objective else None,
        "svd": _get(cfg, "svd"),
    }
    if res.subspace_steps:
        info["subspace_steps_mean"] = sum(res.subspace_steps) / len(res.subspace_steps)
    return CompressedWeight(sparse=res.sparse, U=res.U, V=res.V, info=info)


def validate(cfg: Mapping[str, Any]) -> None:
    if cfg["mask_scope"] not in (None, "row"):
        raise ConfigError("mask_scope", f"got {cfg['mask_scope']!r}; OATS thresholds per row: allowed values None, 'row'")
    nm = parse_nm(cfg["sparsity_type"])
    if nm is not None and 1 - Fraction(repr(float(cfg["sparsity"]))) < Fraction(nm[0], nm[1]):
        raise ConfigError("sparsity", f"OATS compression rate {cfg['sparsity']!r} keeps fewer parameters than the sparse part "
                          f"of sparsity_type {cfg['sparsity_type']!r} holds ({nm[0]}/{nm[1]} of each layer); with N:M the low-rank "
                          f"part takes the rest of the budget and rank_ratio is unused: allowed sparsity <= 1 - N/M = {1 - nm[0] / nm[1]:g}")


def build_module(cw: CompressedWeight, layer: nn.Linear, cfg: Any) -> nn.Module | None:
    """Compress mode: the layer becomes a ``SparseLowRankLinear`` holding S, U, V."""
    if not _get(cfg, "compress") or not cw.is_factored:
        return None
    from oats.algorithm.compressed import SparseLowRankLinear

    return SparseLowRankLinear.from_factors(cw.sparse, cw.U, cw.V, layer.bias, dtype=layer.weight.dtype)


def label(cfg: Mapping[str, Any]) -> str:
    svd = "exact SVD" if cfg.get("svd") == "exact" else "fast"
    return f"OATS (κ={cfg.get('rank_ratio', DEFAULTS['rank_ratio']):g}, {cfg.get('num_iters', DEFAULTS['num_iters'])} it, {svd})"


METHOD = Method(
    "oats", compress_weight, stats="diag",
    doc="`W·diag(√D) ≈ S + L` by alternating thresholding; `sparsity` is the compression rate, `rank_ratio` κ",
    paper="Zhang & Papyan, ICLR 2025", keys=KEYS, lowrank=True, validate=validate, build_module=build_module, label=label,
)

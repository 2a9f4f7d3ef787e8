"""Choosing the forward of a SparseLowRankLinear by measurement, so compress mode is never slower than necessary.

Candidates (every one computes ``x S^T + (x V^T) U^T + b``):

* ``dense_merged``: ``W = S + U V`` materialised once (float32 sum, cast to the layer's dtype), then
  ``F.linear``. Fastest for prefill; costs a dense copy of the weight in memory.
* ``torch_csr``: torch CSR @ dense with the CSR indices built from the mask per call (falling back to
  densifying S where torch has no sparse kernel for the dtype, e.g. bfloat16 on the CPU).
* ``bitmask_kernel``: the compiled bitmask x vector kernel of :mod:`factored.kernels` reading the layer's
  own values and mask (its 2:4 rows by selecting inputs, :meth:`SparseLowRankLinear.two_four_rows`), the
  low-rank part fused (``x Vᵀ`` once, ``U[r] · t`` added per output row). CPU only, when it compiled.
* ``densify``: S scattered into a fresh dense tensor on every call, then ``F.linear`` (+ the low-rank
  part in float32): no dense copy kept, close to dense speed for prefill where the product dominates.
* ``dense_kernel``: the dense-merged W by the compiled dense kernel (AVX2 FMAs; torch's bfloat16 batch-1
  product is several times slower on the CPU). CPU only, when it compiled.

:func:`choose_forward` times each candidate once on the layer's own tensors for a given number of input
rows and caches the winner per ``(device, dtype, shape, rank, density bucket, 2:4 or not, rows bucket)``, so one
calibration serves every layer of the same shape, and on disk per machine (:mod:`factored.calibration`),
so a later run on the same machine measures nothing. The forwards that keep a dense copy
(:data:`DENSE_COPY`) are always timed as the reference ("best dense": the faster of the two), but chosen
only when the caller allows a dense copy (``keep_dense``). :func:`install_auto_forward` makes every
SparseLowRankLinear of a model pick, per call, the winner for the call's row count (decode and prefill
differ), and :func:`forward_record` says what was chosen (a JSON-serialisable dict and a short string
for the result record).
"""
from __future__ import annotations

import logging
import math
import time
import types
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factored import calibration

log = logging.getLogger(__name__)

CANDIDATES = ("dense_merged", "torch_csr", "bitmask_kernel", "dense_kernel", "densify")
DENSE_COPY = ("dense_merged", "dense_kernel")  # the forwards that hold W = S + U V in memory
_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}
_STORED: list[bool] = []  # non-empty once this process has read the stored calibrations (factored.calibration)


def _slr_class():
    from factored.module import SparseLowRankLinear

    return SparseLowRankLinear


def density(layer) -> float:
    return layer.nnz / max(1, layer.in_features * layer.out_features)


def density_bucket(d: float) -> float:
    """Densities share a calibration within 0.05."""
    return round(round(d * 20) / 20, 2)


def rows_bucket(rows: int) -> int:
    """1, 2, 4, 8, 16, 64, 256, 1024, 4096, ... (upper bounds; decode rows are exact up to 16)."""
    if rows <= 16:
        return 1 << max(0, math.ceil(math.log2(max(rows, 1))))
    return 4 ** math.ceil(math.log(rows, 4))


def _version(layer) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (layer.values, layer.U, layer.V, layer.mask))


def dense_merged_weight(layer) -> Tensor:
    """W = S + U V (cached on the layer until its tensors change)."""
    cached = getattr(layer, "_oats_dense", None)
    if cached is not None and cached[0] == _version(layer):
        return cached[1]
    W = layer.merged_weight()
    layer._oats_dense = (_version(layer), W)
    return W


def drop_cached(layer, keep: Iterable[str] = ()) -> None:
    """Free the dense copy unless a forward named in ``keep`` uses it."""
    if not set(DENSE_COPY) & set(keep) and hasattr(layer, "_oats_dense"):
        del layer._oats_dense


def _fw_dense_merged(layer, x2: Tensor) -> Tensor:
    return F.linear(x2, dense_merged_weight(layer), layer.bias)


def _fw_torch_csr(layer, x2: Tensor) -> Tensor:
    try:
        ys = (layer.sparse_weight() @ x2.T).T  # CSR @ dense
    except (RuntimeError, NotImplementedError):  # sparse kernels missing for this dtype/device
        ys = F.linear(x2, layer.sparse_dense())
    y = ys + _lowrank_f32(layer, x2) if layer.rank else ys
    return y + layer.bias if layer.bias is not None else y


def _fw_bitmask_kernel(layer, x2: Tensor) -> Tensor:
    from factored.kernels import bitmask_matmul

    y = bitmask_matmul(layer.values, layer.row_offsets(), layer.mask, x2, layer.U if layer.rank else None, layer.V,
                       regular=layer.two_four_rows())
    if layer.bias is not None:
        y += layer.bias
    return y.to(x2.dtype)


def _lowrank_f32(layer, x2: Tensor) -> Tensor:
    """(x V^T) U^T, in float32 for bfloat16/float16 layers (torch's bf16 CPU products are slow at odd ranks)."""
    if x2.dtype == torch.float32 or x2.device.type != "cpu":
        return (x2 @ layer.V.T) @ layer.U.T
    return F.linear(F.linear(x2.float(), layer.V.float()), layer.U.float()).to(x2.dtype)


def _fw_densify(layer, x2: Tensor) -> Tensor:
    y = F.linear(x2, layer.sparse_dense(), layer.bias)
    return y + _lowrank_f32(layer, x2) if layer.rank else y


def _fw_dense_kernel(layer, x2: Tensor) -> Tensor:
    from factored.kernels import dense_matmul

    y = dense_matmul(dense_merged_weight(layer), x2)
    if layer.bias is not None:
        y += layer.bias
    return y.to(x2.dtype)


FORWARDS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "dense_merged": _fw_dense_merged, "torch_csr": _fw_torch_csr, "bitmask_kernel": _fw_bitmask_kernel,
    "dense_kernel": _fw_dense_kernel, "densify": _fw_densify}


KERNEL_MAX_ROWS = 1024  # the compiled kernels take 8 input rows per pass: timed up to this many rows (bf16 prefill can win)


def available_forwards(layer, x: Tensor | None = None) -> list[str]:
    """The candidates that can run for this layer (and input dtype/device)."""
    device = layer.values.device
    out = ["dense_merged", "torch_csr", "densify"]
    dtype = layer.values.dtype if x is None else x.dtype
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and layer.values.dtype == dtype:
        from factored.kernels import available

        if available():
            out += ["bitmask_kernel", "dense_kernel"]
    return out


def run_forward(layer, x: Tensor, impl: str) -> Tensor:
    """The layer's output for ``x`` [..., in] computed by forward ``impl`` (one of :data:`CANDIDATES`).
    Call under ``torch.no_grad()`` (the dense copies are cached without gradients)."""
    shape = x.shape
    y = FORWARDS[impl](layer, x.reshape(-1, layer.in_features))
    return y.reshape(*shape[:-1], layer.out_features)


def _llc_bytes() -> int:
    """The last-level cache size (sysfs), 32 MiB when unknown."""
    from pathlib import Path

    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = f.read_text().strip().upper()
            mult = {"K": 1024, "M": 1024 ** 2}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KM")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 1024 ** 2


_EVICT: list[Tensor] = []


def evict_caches() -> None:
    """Stream through twice the last-level cache so the next call reads its weights from memory, as in a
    decode step of a whole model (whose weights never fit in the cache)."""
    if not _EVICT:
        _EVICT.append(torch.empty(2 * _llc_bytes() // 4, dtype=torch.float32))
    _EVICT[0].fill_(time.perf_counter() % 1.0)


def _time(fn: Callable[[], object], budget_s: float = 0.02, max_reps: int = 7, cold: bool = False) -> float:
    fn()  # warm-up (builds the representation, first-touch)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (reps < 2 or spent < budget_s):
        if cold:
            evict_caches()
        t = time.perf_counter()
        fn()
        d = time.perf_counter() - t
        best, spent, reps = min(best, d), spent + d, reps + 1
    return best


def pattern(layer) -> str:
    """``"2:4"`` when at least 90% of the layer's rows are 2:4 (:meth:`two_four_rows`: the kernel reads them
    its faster way), else ``"any"``: a 2:4 layer and an unstructured one of the same density calibrate apart."""
    rows = layer.two_four_rows()
    return "2:4" if rows is not None and int(rows.sum()) >= 0.9 * layer.out_features else "any"


KEY_FIELDS = ("device", "dtype", "out_features", "in_features", "rank", "bias", "density", "pattern", "rows")


def cache_key(layer, rows: int, dtype: torch.dtype | None = None) -> tuple:
    """The calibration key, fields :data:`KEY_FIELDS` (:func:`choose_forward` appends the candidates)."""
    return (layer.values.device.type, str(dtype or layer.values.dtype), layer.out_features, layer.in_features, layer.rank,
            layer.bias is not None, density_bucket(density(layer)), pattern(layer), rows_bucket(rows))


COLD_ROWS = 16  # calibrations for at most this many rows time each candidate with cold caches


def choose_forward(layer, rows: int = 1, candidates: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                   recalibrate: bool = False) -> str:
    """The fastest forward for ``rows`` input rows, measured once per :func:`cache_key` on this layer.

    For decode-sized inputs (rows <= :data:`COLD_ROWS`, CPU) the caches are flushed before every timed
    call (:func:`evict_caches`): a lone layer timed in a loop would sit in the cache, which is not what
    a model's decode step sees, and would favour the dense forward."""
    key = cache_key(layer, rows, dtype) + (tuple(candidates) if candidates is not None else None,)
    if not _STORED:
        _STORED.append(True)
        for k, v in calibration.load().items():
            _CACHE.setdefault(k, v)
    if not recalibrate and key in _CACHE:
        return _CACHE[key][0]
    dtype = dtype or layer.values.dtype
    x = torch.randn(rows_bucket(rows), layer.in_features, dtype=dtype, device=layer.values.device)
    runnable = available_forwards(layer, x)
    names = [c for c in (candidates or CANDIDATES) if c in runnable
             and not (c.endswith("_kernel") and x.shape[0] > KERNEL_MAX_ROWS and len(candidates or CANDIDATES) > 1)]
    if not names:
        raise ValueError(f"none of {list(candidates or CANDIDATES)} can run here")
    reference = [c for c in DENSE_COPY if c in runnable and c not in names and not (c.endswith("_kernel") and x.shape[0] > KERNEL_MAX_ROWS)]
    times = {}
    had = set(DENSE_COPY) if hasattr(layer, "_oats_dense") else set()
    with torch.no_grad():
        for n in names + reference:
            try:
                times[n] = _time(lambda n=n: FORWARDS[n](layer, x), cold=rows <= COLD_ROWS and x.device.type == "cpu")
            except Exception as e:  # a candidate that fails here is simply not chosen
                log.warning("forward %s failed on %s: %s", n, key, e)
    best = min((n for n in names if n in times), key=times.get)
    drop_cached(layer, keep=had | {best})
    _CACHE[key] = (best, times)
    calibration.save(_CACHE)
    log.info("forward for %s: %s (%s; best dense / choice %.2f)", key, best, ", ".join(f"{k} {v * 1e6:.0f}us" for k, v in times.items()),
             best_dense(times) / times[best] if best_dense(times) else float("nan"))
    return best


def best_dense(times: dict[str, float]) -> float | None:
    """The best dense path's time among ``times``: the faster of ``dense_merged`` (F.linear) and ``dense_kernel``."""
    ts = [times[c] for c in DENSE_COPY if c in times]
    return min(ts) if ts else None


def calibration_table() -> list[dict]:
    """Every measured calibration: key fields, the choice, each forward's best time (seconds; the dense
    ones are timed as the reference even where they may not be chosen) and the best dense time."""
    n = len(KEY_FIELDS)
    return [{**dict(zip(KEY_FIELDS, k[:n])), "candidates": list(k[n]) if k[n] else None, "choice": c, "seconds": t,
             "best_dense_seconds": best_dense(t)} for k, (c, t) in _CACHE.items()]


def clear_calibration() -> None:
    """Forget every calibration of this process (the stored ones are not read again in it)."""
    _CACHE.clear()
    _STORED[:] = [True]


def _auto_forward(self, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad and self.training):
        return _slr_class().forward(self, x)  # training: only the layer's own forward has gradients
    rows = x.numel() // self.in_features
    b = rows_bucket(rows)
    impl = self._oats_fixed_forward or self._oats_choice.get(b)
    if impl is None:
        impl = choose_forward(self, rows, self._oats_candidates, dtype=x.dtype)
        self._oats_choice[b] = impl
        keep = set(self._oats_choice.values())
        drop_cached(self, keep=keep)
    self._oats_used[impl] = self._oats_used.get(impl, 0) + 1
    return run_forward(self, x, impl)


def install_auto_forward(model: nn.Module, candidates: Iterable[str] | None = None, fixed: str | None = None,
                         keep_dense: bool = False) -> int:
    """Make every SparseLowRankLinear of ``model`` use the measured-fastest forward per call's row count
    (or always ``fixed``). ``dense_merged`` and ``dense_kernel`` (a dense copy of S + U V in memory) are
    timed as the reference but chosen only with ``keep_dense=True`` (or named by ``fixed``).
    Returns the number of layers. Undo with :func:`remove_auto_forward`."""
    cls = _slr_class()
    cands = tuple(candidates) if candidates is not None else CANDIDATES
    if not keep_dense:  # (densify builds its dense S per call and frees it)
        cands = tuple(c for c in cands if c not in DENSE_COPY)
    if fixed is not None and fixed not in FORWARDS:
        raise ValueError(f"forward {fixed!r}: one of {CANDIDATES}")
    n = 0
    for m in model.modules():
        if isinstance(m, cls):
            m._oats_candidates, m._oats_fixed_forward = cands, fixed
            m._oats_choice, m._oats_used = {}, {}
            m.forward = types.MethodType(_auto_forward, m)
            n += 1
    return n


def remove_auto_forward(model: nn.Module) -> None:
    cls = _slr_class()
    for m in model.modules():
        if isinstance(m, cls) and "forward" in m.__dict__:
            del m.forward
            drop_cached(m)
            for a in ("_oats_candidates", "_oats_fixed_forward", "_oats_choice", "_oats_used"):
                m.__dict__.pop(a, None)


def forward_record(model: nn.Module) -> dict:
    """What the installed forwards chose: ``{"summary": "rows<=1: bitmask_kernel x210; ...", "layers":
    {name: {rows bucket: forward}}, "calls": {forward: count}}`` (JSON-serialisable; for the result record)."""
    cls = _slr_class()
    layers, calls, per_bucket = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, cls) and hasattr(m, "_oats_choice"):
            layers[name] = {str(b): c for b, c in sorted(m._oats_choice.items())}
            for c, k in m._oats_used.items():
                calls[c] = calls.get(c, 0) + k
            for b, c in m._oats_choice.items():
                per_bucket.setdefault(b, {}).setdefault(c, 0)
                per_bucket[b][c] += 1
    summary = "; ".join(f"rows<={b}: " + ", ".join(f"{c} x{k}" for c, k in sorted(cs.items()))
                        for b, cs in sorted(per_bucket.items()))
    return {"summary": summary or "none", "layers": layers, "calls": calls}

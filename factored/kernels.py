"""An optional compiled CPU kernel: bitmask-sparse matrix (plus a low-rank pair) times 1-8 vectors (decode).

Layout (the one ``SparseLowRankLinear`` holds, :mod:`factored.bitmask`): the nonzeros row-major
(float32 or bfloat16) and a 1-bit mask per entry, rows padded to 32-bit words (``uint8 [out, 4*words]``,
bit j of byte c = column 8c + j); the row offsets are recomputed from the mask. The bytes read per entry
are ``density * e + 1/8`` (bfloat16 at 50%: 1.125 instead of 2).

The SIMD path is chosen when the kernel is compiled (``-march=native``) and logged (:func:`isa`):

* ``avx2`` (AVX2 + FMA): per mask byte a 256-entry ``pshufb`` table moves the next ``popcount`` packed
  16-bit values into the 8 lanes of the set bits (32-bit values: ``vpermps`` + a lane mask); bf16 is widened
  to f32 by a shift (even lanes) and a mask (odd lanes) against an input stored split the same way, and
  multiply-added in f32; several rows per pass, every input row (up to 8) against each expanded group.
  Rows that are 2:4 (exactly 2 entries in every 4 columns, :func:`factored.bitmask.two_per_nibble`; the
  caller passes them as ``regular``) are read the other way round when a pass has at most 4 input rows:
  their values advance by a fixed stride, are read as they are, and the inputs of the set bits are
  selected to meet them (``vpermilps`` per 128-bit half from a per-byte index table, the input stored with
  its 4-column groups interleaved so that no lane-crossing shuffle is needed). Selecting costs per input
  row what expanding costs per weight row, so more input rows per pass go back to expanding.
* ``avx512-vbmi2`` (AVX-512 F/BW/VL/DQ/VBMI2 only): ``vexpandps`` / ``vpexpandw`` per 32-bit mask word,
  one input row at a time. Not tested on a machine without VBMI2 (where it is not compiled);
  ``OATS_KERNEL_ISA=avx2`` builds the AVX2 path there instead.
* ``portable``: a C loop over the set bits (``OATS_KERNEL_ISA=portable`` forces it anywhere).

The low-rank part is fused: ``t = x Vᵀ`` once per input row (:func:`dense_matmul`), then each output row
adds ``U[r] · t`` in the same pass over the rows. Rows are split over threads (``at::parallel_for``).

``dense_matmul`` is the dense counterpart (AVX2 FMAs, the same bf16 widening): torch 2.13's bfloat16
products on the CPU are slow for batch 1 and pathologically slow when an inner dimension is not a
multiple of 8 (OATS ranks such as 43), so the low-rank part and the ``dense_kernel`` forward use it.

The C++ source is ``bitmask_kernel.cpp`` beside this file, compiled at first use with
``torch.utils.cpp_extension.load_inline`` (g++ -O3 -march=native) into
``$OATS_CACHE_DIR/kernels`` (default ``~/.cache/oats/kernels``), keyed by the source and the CPU's
flags and ``OATS_KERNEL_ISA``. Everything is optional: :func:`kernel` returns None (logged once) when compilation fails, and
the callers fall back to the torch forwards.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

CPP_FILE = Path(__file__).with_name("bitmask_kernel.cpp")
CPP_SOURCE = CPP_FILE.read_text()  # the build key hashes it: an edit rebuilds


_lock = threading.Lock()
_module = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_dir() -> Path:
    from data.files import cache_dir

    return cache_dir("kernels")


ISA_FLAGS = {"native": [], "avx2": ["-DOATS_NO_AVX512"], "portable": ["-DOATS_FORCE_PORTABLE"]}


def requested_isa() -> str:
    """``OATS_KERNEL_ISA`` (``native``, the default: the best path the CPU has; ``avx2``; ``portable``)."""
    isa = os.environ.get("OATS_KERNEL_ISA", "native") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"OATS_KERNEL_ISA={isa!r}: one of {sorted(ISA_FLAGS)}")
    return isa


def kernel():
    """The compiled extension module (functions ``bitmask_matmul``, ``dense_matmul``, ``bitmask_to_dense``, ``simd``), or None if it cannot be
    built here (the reason is logged once and kept in :func:`failure`). Set ``OATS_NO_KERNEL=1`` to skip."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("OATS_NO_KERNEL"):
            _failed = "disabled by OATS_NO_KERNEL"
            return None
        isa = requested_isa()
        digest = hashlib.sha1((CPP_SOURCE + _cpu_flags() + torch.__version__ + isa).encode()).hexdigest()[:12]
        name = f"oats_bitmask_{digest}"
        directory = build_dir() / name
        try:
            import logging as _lg

            from torch.utils.cpp_extension import load_inline

            directory.mkdir(parents=True, exist_ok=True)
            _lg.getLogger("torch.utils.cpp_extension").setLevel(_lg.ERROR)
            _module = load_inline(name, cpp_sources=[CPP_SOURCE], functions=["bitmask_matmul", "dense_matmul", "bitmask_to_dense", "simd"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"],
                                  build_directory=str(directory), verbose=False)
            log.info("oats bitmask kernel compiled (%s, SIMD path: %s) in %s", name, _module.simd(), directory)
        except Exception as e:  # no compiler, no headers, no ninja...
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            log.warning("oats bitmask kernel unavailable, using the torch forwards (%s)", _failed)
            _module = None
        return _module


def failure() -> str | None:
    """Why :func:`kernel` returned None (None when it built or was not tried yet)."""
    return _failed


def available() -> bool:
    return kernel() is not None


def isa() -> str | None:
    """The SIMD path compiled: ``avx512-vbmi2``, ``avx2`` or ``portable``; None without the kernel."""
    mod = kernel()
    return None if mod is None else mod.simd()


def _mod():
    mod = kernel()
    if mod is None:
        raise RuntimeError(f"kernel unavailable: {failure()}")
    return mod


def bitmask_matmul(values: Tensor, offsets: Tensor, mask: Tensor, x: Tensor, U: Tensor | None = None,
                   V: Tensor | None = None, regular: Tensor | None = None) -> Tensor:
    """x [batch, in] -> x Sᵀ (+ (x Vᵀ) Uᵀ) [batch, out] float32 for S in the bitmask layout (values [nnz],
    offsets [out+1] int64, mask uint8 [out, 4*words]); x and U, V are cast to the values' dtype.
    ``regular``: the 2:4 rows (bool or uint8 [out]) exactly as :func:`factored.bitmask.two_per_nibble`
    flags them (a wrongly flagged row gives a wrong result), read by selecting inputs for up to 4 input rows
    per pass; None reads every row by expanding values. Needs :func:`kernel`."""
    mod = _module if _module is not None else _mod()
    dt = values.dtype
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dt:
        x = x.to(dt)
    x = x.contiguous()
    if U is not None and U.shape[1]:
        t = mod.dense_matmul(V.to(dt).contiguous(), x)
        U = U.to(dt).contiguous()
    else:
        U, t = _no_lowrank(mask.shape[0], x.shape[0], dt, str(values.device))
    if regular is None:
        regular = _NO_ROWS
    elif regular.dtype != torch.uint8:
        regular = regular.to(torch.uint8)
    return mod.bitmask_matmul(values.contiguous(), offsets, mask, x, U, t, regular)


_NO_ROWS = torch.empty(0, dtype=torch.uint8)


@functools.lru_cache(maxsize=256)
def _no_lowrank(out: int, batch: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    """Empty U [out, 0] and t [batch, 0] for a rank-0 layer (made once: this runs on every decode call)."""
    return torch.empty(out, 0, dtype=dtype, device=device), torch.empty(batch, 0, dtype=torch.float32, device=device)


def dense_matmul(W: Tensor, x: Tensor) -> Tensor:
    """x [batch, in] @ W^T for a dense W [out, in] (float32/bfloat16, x cast to W's dtype) -> float32
    [batch, out], by the compiled kernel. Needs :func:`kernel`."""
    return _mod().dense_matmul(W.contiguous(), x.reshape(-1, W.shape[1]).to(W.dtype).contiguous())


def bitmask_to_dense(values: Tensor, offsets: Tensor, mask: Tensor, in_features: int) -> Tensor | None:
    """S as a fresh dense [out, in] tensor by the compiled scatter, or None without the kernel (or on a
    device other than the CPU, or for 8-bit values)."""
    mod = kernel()
    if mod is None or values.element_size() not in (2, 4) or values.device.type != "cpu":
        return None
    return mod.bitmask_to_dense(values.detach().contiguous(), offsets, mask, in_features)


class BitmaskMatrix:
    """A standalone S [out, in] in the bitmask layout (for benchmarks and tests of the kernel alone)."""

    def __init__(self, w: Tensor):
        from factored.bitmask import pack, row_offsets, two_four_flags

        self.shape = tuple(w.shape)
        self.values, self.mask = pack(w.detach())
        self.offsets = row_offsets(self.mask)
        self.regular = two_four_flags(self.mask, self.shape[1])

    @classmethod
    def from_dense(cls, w: Tensor) -> "BitmaskMatrix":
        return cls(w)

    def matmul(self, x: Tensor) -> Tensor:
        """x [batch, in] -> x S^T [batch, out] float32. Needs :func:`kernel`."""
        return bitmask_matmul(self.values, self.offsets, self.mask, x, regular=self.regular)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.mask.numel()

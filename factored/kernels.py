"""An optional compiled CPU kernel: bitmask-sparse matrix times a few vectors (batch-1 decode).

Layout (:class:`BitmaskMatrix`): per row, the nonzeros in column order (float32 or bfloat16, the CSR
values as they are), the row offsets (CSR ``crow_indices``) and a 1-bit mask padded to 32-bit words per
row. For every word the AVX-512 path expands the next ``popcount`` values into their lanes
(``vexpandps`` / ``vpexpandw``) and multiply-adds them with the input's 32 entries, so the bytes read per
entry are ``density * e + 1/8`` (bfloat16 at 50%: 1.125 instead of 2). Rows are split over threads
(``at::parallel_for``). Without AVX-512 (F, BW, VBMI2) a portable loop over set bits is compiled instead.

``dense_matmul`` is the same for a dense matrix (W x in float32 FMAs, or AVX-512 BF16 dot products):
torch 2.13's bfloat16 products on this CPU are slow for batch 1 and pathologically slow (milliseconds)
when an inner dimension is not a multiple of 8 (OATS ranks such as 43), so the low-rank part and the
``dense_kernel`` forward use it.

The C++ source is ``bitmask_kernel.cpp`` beside this file, compiled at first use with
``torch.utils.cpp_extension.load_inline`` (g++ -O3 -march=native) into
``$OATS_CACHE_DIR/kernels`` (default ``~/.cache/oats/kernels``), keyed by the source and the CPU's
flags. Everything is optional: :func:`kernel` returns None (logged once) when compilation fails, and
the callers fall back to the torch forwards.
"""
from __future__ import annotations

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


def kernel():
    """The compiled extension module (functions ``bitmask_matmul``, ``simd``), or None if it cannot be
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
        digest = hashlib.sha1((CPP_SOURCE + _cpu_flags() + torch.__version__).encode()).hexdigest()[:12]
        name = f"oats_bitmask_{digest}"
        directory = build_dir() / name
        try:
            import logging as _lg

            from torch.utils.cpp_extension import load_inline

            directory.mkdir(parents=True, exist_ok=True)
            _lg.getLogger("torch.utils.cpp_extension").setLevel(_lg.ERROR)
            _module = load_inline(name, cpp_sources=[CPP_SOURCE], functions=["bitmask_matmul", "dense_matmul", "csr_to_dense", "simd"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  build_directory=str(directory), verbose=False)
            log.info("oats bitmask kernel compiled (%s, AVX-512 path: %s) in %s", name, _module.simd(), directory)
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


class BitmaskMatrix:
    """S [out, in] in the kernel's layout (built from CSR tensors; values shared, not copied)."""

    def __init__(self, values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]):
        out, inp = shape
        self.shape = (out, inp)
        self.words = (inp + 31) // 32
        self.values = values.detach().contiguous()
        self.offsets = crow_indices.detach().to(torch.int64).contiguous()
        rows = torch.repeat_interleave(torch.arange(out), self.offsets.diff())
        cols = col_indices.detach().to(torch.int64)
        word_index = rows * self.words + cols // 32
        bits = torch.ones_like(cols) << (cols % 32)
        mask = torch.zeros(out * self.words, dtype=torch.int64).index_add_(0, word_index, bits)
        mask = torch.where(mask >= 2**31, mask - 2**32, mask)  # reinterpret as int32
        self.mask = mask.to(torch.int32).reshape(out, self.words)

    @classmethod
    def from_layer(cls, layer) -> "BitmaskMatrix":
        return cls(layer.values, layer.crow_indices, layer.col_indices, (layer.out_features, layer.in_features))

    @classmethod
    def from_dense(cls, w: Tensor) -> "BitmaskMatrix":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            csr = w.detach().to_sparse_csr()
        return cls(csr.values(), csr.crow_indices(), csr.col_indices(), tuple(w.shape))

    def matmul(self, x: Tensor) -> Tensor:
        """x [batch, in] -> x S^T [batch, out] float32, x cast to the values' dtype (the model's). Needs :func:`kernel`."""
        mod = kernel()
        if mod is None:
            raise RuntimeError(f"bitmask kernel unavailable: {failure()}")
        x = x.reshape(-1, self.shape[1]).to(self.values.dtype)
        pad = self.words * 32 - self.shape[1]
        x = F.pad(x, (0, pad)) if pad else x.contiguous()
        return mod.bitmask_matmul(self.values, self.offsets, self.mask, x, self.shape[0])

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.mask.numel() * 4 + self.offsets.numel() * 8


def dense_matmul(W: Tensor, x: Tensor) -> Tensor:
    """x [batch, in] @ W^T for a dense W [out, in] (float32/bfloat16, x cast to W's dtype) -> float32
    [batch, out], by the compiled kernel (AVX-512 BF16 dot products for bfloat16). Needs :func:`kernel`."""
    mod = kernel()
    if mod is None:
        raise RuntimeError(f"kernel unavailable: {failure()}")
    return mod.dense_matmul(W.contiguous(), x.reshape(-1, W.shape[1]).to(W.dtype).contiguous())


def csr_to_dense(layer) -> Tensor | None:
    """S of a SparseLowRankLinear as a fresh dense tensor by the compiled scatter, or None without the kernel."""
    mod = kernel()
    if mod is None or layer.values.element_size() not in (2, 4) or layer.values.device.type != "cpu":
        return None
    return mod.csr_to_dense(layer.values.detach().contiguous(), layer.crow_indices.to(torch.int64).contiguous(),
                            layer.col_indices.to(torch.int32).contiguous(), layer.out_features, layer.in_features)

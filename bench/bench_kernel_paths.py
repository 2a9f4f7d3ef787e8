"""The compiled bitmask kernel's two ways of reading rows side by side on the same layers, against the best
dense path, hot and cold: expanding the values per mask byte (any mask) and, for 2:4 rows, selecting the
inputs (``factored.kernels.bitmask_matmul(..., regular=...)``).

    python bench/bench_kernel_paths.py                   # 1 thread, batch 1 and 4, SmolLM2-135M block 15
    python bench/bench_kernel_paths.py --batches 1 2 --rounds 5

Layers: SmolLM2-135M block 15's q_proj [576, 576], k_proj [192, 576], up_proj [1536, 576] and
down_proj [576, 1536], masked by magnitude to 2:4 and to 50% per row (unstructured), rank 0. Per layer and
dtype every forward is timed in the same run, interleaved, best of ``--rounds`` (see
``bench_inference.interleaved``; cold = twice the last-level cache overwritten before each call). Printed
as times (us) and as speedups over the best dense path (the faster of ``F.linear`` and the dense kernel
on the dense weight) and over the expand path on the same 2:4 layer. The select path reads the rows with 2
set bits in every mask nibble (``factored.bitmask.two_per_nibble``; SmolLM2's weights hold a few exact
zeros, so a few rows of a magnitude 2:4 mask do not qualify and are read by the expand path) for up to 4
input rows; past that the kernel expands every row.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_inference import interleaved, load, machine, make_layer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from factored import bitmask as bm
    from factored.kernels import available, bitmask_matmul, dense_matmul
    from oats.models import load_model

    if not available():
        raise SystemExit("kernel unavailable")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    model, _ = load_model("smollm2-135m", "float32")
    blk = model.model.layers[15]
    weights = {(576, 576): blk.self_attn.q_proj.weight, (192, 576): blk.self_attn.k_proj.weight,
               (1536, 576): blk.mlp.up_proj.weight, (576, 1536): blk.mlp.down_proj.weight}
    print(f"# bench_kernel_paths\n\nCommit {commit}. {machine()}. Load average at start: {load()}.\n")
    print("| dtype | layer [out, in] | batch | caches | F.linear (us) | dense_kernel (us) | 50% expand (us) | 2:4 expand (us) | "
          "2:4 select (us) | 2:4 select / best dense | 2:4 select / 2:4 expand | 50% expand / best dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    regular = {}
    for dtype in [getattr(torch, d) for d in a.dtypes]:
        for shape, W in weights.items():
            W = W.detach().to(dtype)
            nm, un = make_layer(W, "2:4"), make_layer(W, "wanda50")
            off_nm, off_un = nm.row_offsets(), un.row_offsets()
            reg = bm.two_per_nibble(nm.mask, shape[1]).to(torch.uint8)
            regular[(str(dtype).removeprefix("torch."), shape)] = f"{int(reg.sum())}/{shape[0]}"
            for batch in a.batches:
                x = torch.randn(batch, shape[1]).to(dtype)
                fns = {"F.linear": lambda: F.linear(x, W), "dense_kernel": lambda: dense_matmul(W, x),
                       "50% expand": lambda: bitmask_matmul(un.values, off_un, un.mask, x),
                       "2:4 expand": lambda: bitmask_matmul(nm.values, off_nm, nm.mask, x),
                       "2:4 select": lambda: bitmask_matmul(nm.values, off_nm, nm.mask, x, regular=reg)}
                for cold in (True, False):
                    with torch.no_grad():
                        t = interleaved(fns, a.rounds, reps=7 if cold else 50, cold=cold)
                    dense = min(t["F.linear"], t["dense_kernel"])
                    print(f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | {batch} | {'cold' if cold else 'hot'} | "
                          + " | ".join(f"{t[k] * 1e6:.1f}" for k in fns)
                          + f" | {dense / t['2:4 select']:.2f} | {t['2:4 expand'] / t['2:4 select']:.2f} | "
                          f"{dense / t['50% expand']:.2f} |", flush=True)
    print("\nRows of the 2:4 layers with 2 set bits in every mask nibble (the others hold a kept exact zero, read by the "
          "expand path): " + ", ".join(f"{d} {list(s)}: {r}" for (d, s), r in regular.items()))
    print(f"\nLoad average at end: {load()}. Threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}).")


if __name__ == "__main__":
    main()

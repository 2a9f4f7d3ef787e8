"""Time one compressed decoder block of Llama-3-8B's shape on the GPU: OATS (fast subspace SVD) vs. OATS
with a full SVD every iteration (``svd: exact``) vs. SparseGPT vs. Wanda, same block, same calibration activations.

    python bench/bench_gpu.py                          # CUDA, Llama-3-8B block, 128 x 2048 tokens
    python bench/bench_gpu.py --device cpu --scale 0.125 --nsamples 4 --seqlen 128   # CPU smoke run

The block is randomly initialised from Llama-3-8B's config (hidden 4096, MLP 14336, 32 heads, 8 KV
heads); weights being random changes nothing in the cost of the algorithms. Calibration inputs are
random token ids through a small random embedding. ``--scale`` shrinks every width (for CPU tries).
Each method runs through ``oats.compressor.compress_model`` on a fresh copy of the block: the time
covers the statistics pass, the seven layers' compression and the forward to the next block's
inputs; "method s" sums the per-layer compression times alone. Methods not registered are skipped.
Prints the device name, versions and protocol next to the numbers.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "oats (fast svd)": dict(method="oats", svd="fast"),
    "oats (exact svd)": dict(method="oats", svd="exact"),
    "sparsegpt": dict(method="sparsegpt"),
    "wanda": dict(method="wanda"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--stats-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every width (1.0 = Llama-3-8B)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--num-iters", type=int, default=80)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from oats.compressor import compress_model
    from oats.config import resolve
    from data.files import torch_dtype
    from oats.pipeline import capture_inputs
    from oats.registry import METHODS

    device = torch.device(args.device)
    w = lambda n: max(64, int(n * args.scale) // 64 * 64)  # noqa: E731
    heads = max(1, int(32 * args.scale))
    cfg_model = LlamaConfig(vocab_size=1024, hidden_size=w(4096), intermediate_size=w(14336), num_hidden_layers=1,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=max(args.seqlen, 8192),
                            rope_theta=500000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg_model, dtype=torch_dtype(args.dtype)).eval()
    ids = torch.randint(0, 1024, (args.nsamples, args.seqlen))
    inputs = capture_inputs(model, ids, device, args.batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}); torch {torch.__version__}, Python {platform.python_version()}")
    print(f"protocol: one random Llama-3-8B-shaped block (hidden {w(4096)}, MLP {w(14336)}, {heads} heads), {args.dtype} weights, "
          f"{args.stats_dtype} statistics, {args.nsamples} x {args.seqlen} calibration tokens (batch {args.batch}), "
          f"sparsity {args.sparsity}, OATS {args.num_iters} iterations, rank ratio 0.3")
    print("\n| method | block s | method s (7 layers) | scaled rel. error (mean) | peak GPU MiB |")
    print("|---|---|---|---|---|")
    for label in args.variants.split(","):
        over = VARIANTS[label]
        if over["method"] not in METHODS:
            print(f"| {label} | not registered | | | |")
            continue
        cfg = resolve(dict(model="bench", sparsity=args.sparsity, stats_dtype=args.stats_dtype, num_iters=args.num_iters,
                           device=device.type, **over))
        m = copy.deepcopy(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        recs = compress_model(m, inputs, cfg, device, [args.sparsity])
        if device.type == "cuda":
            torch.cuda.synchronize()
        block_s = time.perf_counter() - t
        errs = [r["scaled_rel_error"] for r in recs if r.get("scaled_rel_error") is not None]
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        print(f"| {label} | {block_s:.2f} | {sum(r['seconds'] for r in recs):.2f} | {sum(errs) / max(len(errs), 1):.4f} | {peak:.0f} |")
        del m


if __name__ == "__main__":
    main()

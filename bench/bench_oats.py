"""Time OATS alternating thresholding on SmolLM2-135M's real weights and calibration statistics (one
decoder block, 7 matrices): the reference loop, our exact path and our fast path, with the speedups
measured in one run.

    python bench/bench_oats.py                       # block 15, 80 iterations, CPU
    python bench/bench_oats.py --iters 20 --block 0 --device cuda

Protocol: the block's inputs come from ``--nsamples`` random C4 windows of ``--seqlen`` tokens
(``--data-dir``, default /work/shared/data; pydoc when absent) streamed through the dense model; D is
each layer's mean input x^2. Compression rate ``--rho``, rank ratio ``--kappa``. Every matrix runs

* ``reference``: the loop of the paper's public code (float32): a full thin SVD of ``W_s - S``, the
  singular values past r zeroed, ``L = U diag(s) V^T`` rebuilt from all factors, and a full stable sort
  of each row of ``|W_s - L|`` to zero its smallest entries (``tests.test_oats_reference.reference_loop``,
  written from that description and checked there against the exact path; with our budget's kept count
  so all three loops solve the same problem);
* ``exact``: ``decompose(svd="exact")``, a full thin SVD every iteration, rank-r product, ``topk``;
* ``fast``: ``decompose(svd="fast")``, warm-started subspace iteration and warm-started thresholding,

each timed ``--repeat`` times (interleaved; the fastest is kept) after one warm-up matrix; the scaled
relative objective
||(W - S - UV) diag(sqrt D)||_F / ||W diag(sqrt D)||_F of each is printed next to the times.
``--skip-reference`` leaves the reference loop out.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_lowrank.common import oats_budget  # noqa: E402
from sparse_lowrank.decompose import SVD_TOL, decompose, scaled_objective  # noqa: E402
from tests.test_oats_reference import reference_loop  # noqa: E402


def block_problems(block: int, nsamples: int, seqlen: int, data_dir: str | None, seed: int = 0):
    """[(name, W [out, in] float32, D [in])] for every linear layer of decoder block ``block``."""
    from data import calibration_windows
    from oats.architectures import get_blocks
    from oats.models import load_model
    from oats.pipeline import capture_inputs, stream

    model, tok = load_model("smollm2-135m", "float32")
    dataset = "c4" if data_dir and Path(data_dir).is_dir() else "pydoc"
    ids = calibration_windows(tok, dataset, nsamples, seqlen, "random_windows", seed, data_dir if dataset == "c4" else None)
    inputs = capture_inputs(model, ids, torch.device("cpu"), 8)
    out: list = []

    def on_block(i, blk, layers, collector, inputs):
        if i == block:
            out.extend((n, l.weight.data.float().clone(), collector.stats(n).second_moment.clone()) for n, l in layers.items())
            raise StopIteration

    try:
        stream(model, inputs, torch.device("cpu"), "diag", on_block, desc="stats")
    except StopIteration:
        pass
    assert len(get_blocks(model)) > block
    return out, dataset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, *args):
    """(wall seconds of fn(*args) with the device synchronised on both sides, its result)."""
    sync(device)
    t = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t, out


def run(W, D, b, iters, svd, device, tol=SVD_TOL):
    W, D = W.to(device), D.to(device)
    dt, res = timed(device, lambda: decompose(W, D, b.rank, b.keep_per_row, iters, b.nm, svd=svd, tol=tol, track_objective=False))
    return dt, scaled_objective(W, D, res.sparse, res.U, res.V), res.subspace_steps


def run_reference(W, D, b, iters, device):
    W, D = W.to(device), D.to(device)
    dt, (sparse, U, V) = timed(device, reference_loop, W, D, b.rank, b.keep_per_row, iters)
    return dt, scaled_objective(W, D, sparse, U, V)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=15)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--kappa", type=float, default=0.3)
    p.add_argument("--nm", default=None, help="e.g. 2:8 (N kept of every M) for an N:M sparse part")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None, help="comma-separated layer names")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--tol", type=float, default=SVD_TOL, help="fast path's svd_tol")
    p.add_argument("--repeat", type=int, default=1, help="time each path this many times (interleaved), keep the fastest")
    p.add_argument("--skip-reference", action="store_true", help="time only the exact and fast paths")
    p.add_argument("--cache", default=None, help="save/load the block's (W, D) here to skip the calibration pass")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    if args.cache and Path(args.cache).is_file():
        probs, dataset = torch.load(args.cache)
    else:
        probs, dataset = block_problems(args.block, args.nsamples, args.seqlen, args.data_dir)
        if args.cache:
            torch.save((probs, dataset), args.cache)
    if args.only:
        probs = [pr for pr in probs if pr[0] in args.only.split(",")]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"protocol: smollm2-135m block {args.block}, D from {args.nsamples}x{args.seqlen} {dataset} tokens, "
          f"rho={args.rho} kappa={args.kappa} nm={args.nm} iters={args.iters} svd_tol={args.tol}, float32")
    # warm-up (allocators, BLAS threads, CUDA kernels)
    n0, W0, D0 = probs[0]
    b0 = oats_budget(*W0.shape, args.rho, args.kappa, nm)
    ref = not args.skip_reference and nm is None  # the reference loop here is unstructured only
    if ref:
        run_reference(W0, D0, b0, 2, device)
    run(W0, D0, b0, 2, "exact", device)
    run(W0, D0, b0, 3, "fast", device, args.tol)
    print(f"{'layer':24s} {'shape':>10s} {'rank':>4s} {'ref s':>7s} {'exact s':>7s} {'fast s':>7s} "
          f"{'fast/ex':>7s} {'fast/ref':>8s} {'obj ref':>8s} {'obj exact':>9s} {'obj fast':>8s} {'fast-ex':>7s} {'steps':>5s}")
    tr_all = te_all = tf_all = 0.0
    for name, W, D in probs:
        b = oats_budget(*W.shape, args.rho, args.kappa, nm)
        tr = te = tf = float("inf")
        orf = float("nan")
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits every path alike
            if ref:
                t, orf = run_reference(W, D, b, args.iters, device)
                tr = min(tr, t)
            t, oe, _ = run(W, D, b, args.iters, "exact", device)
            te = min(te, t)
            t, of, steps = run(W, D, b, args.iters, "fast", device, args.tol)
            tf = min(tf, t)
        tr = tr if ref else float("nan")
        tr_all += tr
        te_all += te
        tf_all += tf
        mean_steps = sum(steps) / max(len(steps), 1)
        print(f"{name:24s} {W.shape[0]:>4d}x{W.shape[1]:<5d} {b.rank:>4d} {tr:7.2f} {te:7.2f} {tf:7.2f} "
              f"{te / tf:7.1f} {tr / tf:8.1f} {orf:8.5f} {oe:9.5f} {of:8.5f} {(of - oe) / oe:+7.2%} {mean_steps:5.2f}")
    print(f"{'block total':24s} {'':>10s} {'':>4s} {tr_all:7.2f} {te_all:7.2f} {tf_all:7.2f} "
          f"{te_all / tf_all:7.1f} {tr_all / tf_all:8.1f}")


if __name__ == "__main__":
    main()

"""Time OPTIMA's batched CG solver against the per-row exact solver on real SmolLM2-135M layers.

    python bench/bench_optima.py                       # blocks 2 and 20, c4 calibration if available
    python bench/bench_optima.py --blocks 10 --nsamples 32 --device cuda

Protocol: the real Gram H = sum x^T x of every linear layer's input in the chosen blocks (dense model,
``--nsamples`` random windows of ``--seqlen`` tokens, seed 0), dampened by percdamp = 0.01 of its mean
diagonal; masks: Wanda scores |W| ||X_j|| at 50% per row, and 2:4. Per layer and mask: the exact
float64 row-by-row solve (``exact_rowwise``) and ``batched`` (float32/float64, Jacobi and H^-1
preconditioners, cold start from W*mask), tol 1e-6. Reported: seconds, CG iterations, objective gap
(f_batched - f_exact) / f_exact, and the objective ratio f_exact / f_mask_only. Layers sharing an input
(q/k/v, gate/up) share H; timings exclude the statistics pass.
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

from weight_updates import optima  # noqa: E402
from baselines.masks import keep_topk_rows, nm_mask  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}; threads {torch.get_num_threads()}; os.cpu_count {os.cpu_count()}"


def real_layers(blocks: list[int], nsamples: int, seqlen: int, data_dir: str | None, device: torch.device):
    from data import calibration_windows
    from oats.models import load_model
    from oats.pipeline import capture_inputs, stream

    model, tok = load_model("smollm2-135m", "float32")
    dataset = "c4" if data_dir else "pydoc"
    ids = calibration_windows(tok, dataset, nsamples, seqlen, "random_windows", 0, data_dir)
    inputs = capture_inputs(model, ids, device, 8)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Done(Exception):
        pass

    def on_block(i, block, layers, collector, inputs):
        if i in blocks:
            for name, lin in layers.items():
                out[f"{i}.{name}"] = (lin.weight.data.float().clone(), collector.stats(name).gram.clone())
        if i >= max(blocks):
            raise Done

    try:
        stream(model, inputs, device, "gram", on_block, torch.float64)
    except Done:
        pass
    return out, dataset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 20])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=os.environ.get("OATS_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", nargs="*", default=["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"],
                   help="layer name suffixes to bench (q: 576x576, k: 192x576, up: 1536x576, down: 576x1536)")
    p.add_argument("--tol", type=float, default=1e-6)
    args = p.parse_args()
    device = torch.device(args.device)
    data_dir = args.data_dir if (Path(args.data_dir) / "README.md").is_file() else None

    layers, dataset = real_layers(args.blocks, args.nsamples, args.seqlen, data_dir, device)
    print(f"# OPTIMA solver bench\nmachine: {machine()}; device {device}")
    print(f"protocol: smollm2-135m float32, calibration {dataset} random_windows {args.nsamples}x{args.seqlen} seed 0, "
          f"Gram in float64, percdamp 0.01, tol {args.tol}, cold start W*mask, masks: Wanda 50% per row and 2:4\n")
    print("| layer | shape | mask | solver | seconds | iters | (f - f_exact)/f_exact | f_exact/f_mask |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (W, G) in layers.items():
        if not any(name.endswith(s) for s in args.layers):
            continue
        W, G = W.to(device), G.to(device)
        H, _, _, _ = optima.dampen(G, 0.01, torch.float64)
        score = W.abs() * torch.diagonal(G).float().sqrt()
        masks = {"50%": keep_topk_rows(score, W.shape[1] - W.shape[1] // 2), "2:4": nm_mask(score, 2, 4)}
        for mname, mask in masks.items():
            sync(device)
            t = time.perf_counter()
            W_ex = optima.exact_rowwise(W, H, mask)
            sync(device)
            t_ex = time.perf_counter() - t
            f_ex = float(optima.row_objective(W_ex, W, H).sum())
            f_mask = float(optima.row_objective(W * mask, W, H).sum())
            shape = "x".join(map(str, W.shape))
            print(f"| {name} | {shape} | {mname} | exact per-row float64 | {t_ex:.3f} | – | 0 | {f_ex / f_mask:.4f} |")
            for dtype in (torch.float32, torch.float64):
                Hs = H.to(dtype)
                for precond in optima.PRECONDITIONERS:
                    sync(device)
                    t = time.perf_counter()
                    Wb, info = optima.batched(W, Hs, mask, args.tol, 2000, dtype, precond=precond)
                    sync(device)
                    tb = time.perf_counter() - t
                    fb = float(optima.row_objective(Wb, W, H).sum())
                    tag = f"batched {str(dtype)[6:]} {precond}" + ("" if info["converged"] else " (cap)")
                    print(f"| {name} | {shape} | {mname} | {tag} | {tb:.3f} | {info['iters']} | {(fb - f_ex) / f_ex:.1e} | {fb / f_mask:.4f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()

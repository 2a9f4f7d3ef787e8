"""Inference cost of compressed SmolLM2 on the CPU: bytes on disk, weights in memory, prefill and decode.

    python bench/bench_inference.py                     # everything (a few minutes on 2 cores)
    python bench/bench_inference.py --skip-model        # layers and the kernel crossover only
    python bench/bench_inference.py --dtypes bfloat16 --rounds 5

Variants, built from SmolLM2-135M's own weights (masks by magnitude, so nothing is calibrated):

- ``dense``: the checkpoint as it is (``nn.Linear``);
- ``wanda50``: 50% unstructured per row (magnitude masks stand in for Wanda's: same shapes and densities);
- ``2:4``: 2 of every 4 inputs kept (magnitude);
- ``oats50``: OATS-shaped at compression 0.5, rank_ratio 0.3: S keeps ``oats_budget(...).keep_per_row``
  per row, U [out, r], V [r, in] random (timing only; r from ``sparse_lowrank.common.oats_budget``).

Sparse variants are ``SparseLowRankLinear`` layers (rank 0 for wanda50 and 2:4) run with a named forward
(``factored.forward``): ``auto`` (measured choice per call's row count; keeps a dense copy when prefill
chooses ``dense_merged``), ``lean`` (auto without ``dense_merged``: no dense copy), ``torch_csr`` (the
layer's own forward, torch CSR @ dense; decode timed over 1/8 of the steps), ``bitmask_kernel``,
``dense_kernel``, ``densify`` (per layer only).

Protocol: every number is a ratio to dense measured in the same run; variants are interleaved (round
robin) and each keeps its best of ``--rounds``. Layer decode (batch 1) is timed with cold caches (twice
the last-level cache is overwritten before each call, as in a whole-model decode step whose weights do
not fit in the cache) and, for the crossover, hot as well. Prefill is one call of 512 rows (one 512-token
sequence). Model decode: 16-token prompt, then ``--decode`` greedy steps with the KV cache, tokens/s.
Bytes on disk: the ``export_model`` files (format ``bitmask``; ``dense`` for the dense row), all files
counted. Weights in memory: bytes of every tensor the model holds, forward caches included.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SHAPES = ((576, 1536), (1536, 576))  # [out, in]: down_proj, gate/up_proj


def machine() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from factored.kernels import available, kernel

    simd = kernel().simd() if available() else None
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"kernel: {'AVX-512' if simd else ('portable' if simd is False else 'unavailable')}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------- variants


def magnitude_mask(W: torch.Tensor, keep_per_row: int) -> torch.Tensor:
    idx = W.abs().float().topk(keep_per_row, dim=1).indices
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)


def nm_mask(W: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    g = W.abs().float().reshape(W.shape[0], -1, m)
    return torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(n, dim=-1).indices, True).reshape(W.shape)


def make_layer(W: torch.Tensor, variant: str, bias=None, seed: int = 0):
    """A SparseLowRankLinear of ``variant`` built from dense W (float32 math, W's dtype)."""
    from factored.module import SparseLowRankLinear
    from sparse_lowrank.common import oats_budget

    out, inp = W.shape
    Wf = W.float()
    if variant == "wanda50":
        S, r = Wf * magnitude_mask(Wf, inp // 2), 0
    elif variant == "2:4":
        S, r = Wf * nm_mask(Wf), 0
    elif variant == "oats50":
        b = oats_budget(out, inp, 0.5, 0.3)
        S, r = Wf * magnitude_mask(Wf, b.keep_per_row), b.rank
    elif variant.startswith("density"):
        S, r = Wf * magnitude_mask(Wf, max(1, round(float(variant[7:]) * inp))), 0
    else:
        raise ValueError(variant)
    g = torch.Generator().manual_seed(seed)
    scale = Wf.std().item() / max(1, r) ** 0.5 * 0.3
    U = torch.randn(out, r, generator=g) * scale
    V = torch.randn(r, inp, generator=g)
    return SparseLowRankLinear.from_factors(S, U, V, bias, dtype=W.dtype).eval()


def compress_model(model: nn.Module, variant: str) -> nn.Module:
    from factored.module import set_module
    from oats.architectures import get_blocks, linear_layers

    with torch.no_grad():
        for block in get_blocks(model):
            for name, lin in list(linear_layers(block).items()):
                set_module(block, name, make_layer(lin.weight.detach(), variant, lin.bias))
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers, forward caches), shared storage once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        d = getattr(m, "_oats_dense", None)
        if d is not None:
            add(d[1])
        bm = getattr(m, "_oats_bitmask", None)
        if bm is not None:
            for t in (bm[1].values, bm[1].mask, bm[1].offsets):
                add(t)
    return total


# ----------------------------------------------------------------------------------------- timing


def _best(fn, reps: int, cold: bool) -> float:
    from factored.forward import evict_caches

    best = float("inf")
    for _ in range(reps):
        if cold:
            evict_caches()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved(fns: dict, rounds: int, reps: int, cold: bool) -> dict:
    for f in fns.values():  # warm-up: caches built, calibrations done
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            best[k] = min(best[k], _best(f, reps, cold))
    return best


def layer_table(dtypes, rounds: int, weights: dict) -> list[str]:
    from export.formats import bitmask_bytes, dense_bytes, nm_bytes
    from factored.forward import install_auto_forward, run_forward

    rows = ["| dtype | layer [out, in] | variant | forward | bytes / dense | decode b=1 cold (us) | / dense | prefill 512 (ms) | / dense |",
            "|---|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for shape, W in weights.items():
            W = W.to(dtype)
            x1 = torch.randn(1, shape[1]).to(dtype)
            xp = torch.randn(512, shape[1]).to(dtype)
            fns1, fnsp, info = {("dense", "F.linear"): lambda: F.linear(x1, W)}, {("dense", "F.linear"): lambda: F.linear(xp, W)}, {}
            info[("dense", "F.linear")] = 1.0
            for variant in ("wanda50", "2:4", "oats50"):
                layer = make_layer(W, variant)
                nz = layer.nnz
                b = nm_bytes(shape, 2, 4, dtype) if variant == "2:4" else bitmask_bytes(shape, nz, dtype)
                b += layer.rank * sum(shape) * W.element_size()
                for impl in ("dense_merged", "torch_csr", "densify", "bitmask_kernel", "dense_kernel", "auto"):
                    if impl.endswith("_kernel"):
                        from factored.kernels import available

                        if not available():
                            continue
                    lay = copy.deepcopy(layer)
                    if impl == "auto":
                        install_auto_forward(nn.Sequential(lay))
                        f1, fp = (lambda lay=lay: lay(x1)), (lambda lay=lay: lay(xp))
                    else:
                        f1, fp = (lambda lay=lay, impl=impl: run_forward(lay, x1, impl)), (lambda lay=lay, impl=impl: run_forward(lay, xp, impl))
                    fns1[(variant, impl)], fnsp[(variant, impl)], info[(variant, impl)] = f1, fp, b / dense_bytes(shape, dtype)
                    if impl == "auto":
                        info[(variant, "auto_layer")] = lay
            with torch.no_grad():
                t1 = interleaved(fns1, rounds, reps=7, cold=True)
                tp = interleaved(fnsp, rounds, reps=2, cold=False)
            for k in fns1:
                name = k[1]
                if k[1] == "auto":
                    ch = info[(k[0], "auto_layer")]._oats_choice
                    name = f"auto ({ch.get(1, '?')} / {ch.get(1024, '?')})"
                rows.append(f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | {k[0]} | {name} | {info[k]:.3f} | "
                            f"{t1[k] * 1e6:.0f} | {t1[k] / t1[('dense', 'F.linear')]:.2f} | {tp[k] * 1e3:.2f} | "
                            f"{tp[k] / tp[('dense', 'F.linear')]:.2f} |")
    return rows


def crossover(dtypes, rounds: int) -> list[str]:
    """Kernel (S only) vs dense F.linear at batch 1 over densities; the crossover density interpolated."""
    from factored.kernels import BitmaskMatrix, available

    if not available():
        return ["kernel unavailable: no crossover"]
    from factored.kernels import dense_matmul

    rows = ["| dtype | layer [out, in] | caches | vs | " + " | ".join(f"{d:g}" for d in DENSITIES) + " | crossover density |",
            "|---|---|---|---|" + "---|" * len(DENSITIES) + "---|"]
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for shape in SHAPES:
            W = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
            x = torch.randn(1, shape[1], generator=g).to(dtype)
            mats = {d: BitmaskMatrix.from_dense(W * (torch.rand(*shape, generator=g) < d)) for d in DENSITIES}
            for cold in (True, False):
                fns = {"dense": lambda: F.linear(x, W), "dense_kernel": lambda: dense_matmul(W, x)}
                fns.update({d: (lambda m=m: m.matmul(x)) for d, m in mats.items()})
                with torch.no_grad():
                    t = interleaved(fns, rounds, reps=7 if cold else 50, cold=cold)
                for ref in ("dense", "dense_kernel"):
                    rows.append(_cross_row(dtype, shape, cold, ref, [t[d] / t[ref] for d in DENSITIES]))
    return rows


def _cross_row(dtype, shape, cold, ref, ratios) -> str:
    """One crossover row: the density where kernel/reference time first reaches 1 (linear interpolation)."""
    cross = None
    for (d0, r0), (d1, r1) in zip(zip(DENSITIES, ratios), zip(DENSITIES[1:], ratios[1:])):
        if cross is None and r0 < 1 <= r1:
            cross = f"{d0 + (1 - r0) * (d1 - d0) / (r1 - r0):.2f}"
    if cross is None:
        cross = f"> {DENSITIES[-1]}" if ratios[-1] < 1 else (f"< {DENSITIES[0]}" if ratios[0] >= 1 else "none")
    return (f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | {'cold' if cold else 'hot'} | "
            f"{'F.linear' if ref == 'dense' else 'dense_kernel'} | " + " | ".join(f"{r:.2f}" for r in ratios) + f" | {cross} |")


# ----------------------------------------------------------------------------------------- model


def model_table(base: nn.Module, tok, dtypes, rounds: int, n_decode: int, tmp: Path) -> list[str]:
    from export import export_model
    from factored.forward import forward_record, install_auto_forward

    rows = ["| dtype | variant | forward | bytes on disk (MB) | / dense | weights in memory (MB) | / dense | prefill 512 (s) | / dense | decode tok/s | / dense | forwards chosen |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tok), (1, 16), generator=g)
    long = torch.randint(0, len(tok), (1, 512), generator=g)

    def prefill(m):
        with torch.no_grad():
            m(long, use_cache=False)

    def decode(m, steps):
        """Seconds per token over ``steps`` greedy decode steps."""
        with torch.no_grad():
            out = m(prompt, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(steps):
                out = m(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t) / steps

    def steps(k):
        return max(2, n_decode // 8) if k[1] == "torch_csr" else n_decode  # the slow baseline: fewer steps

    for dtype in dtypes:
        dense = copy.deepcopy(base).to(dtype).eval()
        models = {("dense", "nn.Linear"): dense}
        disk = {}
        d = tmp / "dense"
        disk["dense"] = export_model(dense, d, "dense")["total"]["file_bytes"]
        shutil.rmtree(d)
        for variant in ("wanda50", "2:4", "oats50"):
            m = compress_model(copy.deepcopy(dense), variant)
            d = tmp / variant.replace(":", "")
            disk[variant] = export_model(m, d, "bitmask")["total"]["file_bytes"]
            shutil.rmtree(d)
            policies = ("auto", "lean", "torch_csr") if variant == "oats50" else ("auto", "lean")
            for pol in policies:
                mm = m if pol == policies[-1] else copy.deepcopy(m)
                if pol == "auto":
                    install_auto_forward(mm)
                elif pol == "lean":
                    install_auto_forward(mm, keep_dense=False)
                models[(variant, pol)] = mm
            gc.collect()
        for k, mm in models.items():  # warm-up: calibrations, caches
            decode(mm, 2)
            if k[1] != "torch_csr":
                prefill(mm)
        best_p = {k: float("inf") for k in models}
        best_d = dict(best_p)
        for _ in range(rounds):
            for k, mm in models.items():
                if k[1] != "torch_csr":  # CSR prefill takes minutes; the row says n/m
                    t = time.perf_counter()
                    prefill(mm)
                    best_p[k] = min(best_p[k], time.perf_counter() - t)
                best_d[k] = min(best_d[k], decode(mm, steps(k)))
        dk = ("dense", "nn.Linear")
        mem_dense = resident_bytes(dense)
        for k, mm in models.items():
            mem = resident_bytes(mm)
            rec = forward_record(mm)["summary"] if k[0] != "dense" else ""
            tps, tps_d = 1 / best_d[k], 1 / best_d[dk]
            pre = f"{best_p[k]:.2f} | {best_p[k] / best_p[dk]:.2f}" if best_p[k] < float("inf") else "n/m | n/m"
            rows.append(f"| {str(dtype).removeprefix('torch.')} | {k[0]} | {k[1]} | {disk[k[0]] / 1e6:.1f} | {disk[k[0]] / disk['dense']:.3f} | "
                        f"{mem / 1e6:.0f} | {mem / mem_dense:.2f} | {pre} | {tps:.1f} | {tps / tps_d:.2f} | {rec} |")
        print("\n".join(rows if dtype == dtypes[0] else rows[-len(models):]), flush=True)  # as each dtype finishes
        del models, dense
        gc.collect()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", type=int, default=32, help="decode steps timed per round")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--model-dtypes", nargs="+", default=None, help="dtypes of the whole-model table (default: --dtypes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtypes = [getattr(torch, d) for d in a.dtypes]
    from oats.models import load_model

    t0 = time.time()
    load0 = load()
    model, tok = load_model("smollm2-135m", "float32")
    blk = model.model.layers[15]
    weights = {(576, 1536): blk.mlp.down_proj.weight.detach().clone(), (1536, 576): blk.mlp.up_proj.weight.detach().clone()}
    print(f"# bench_inference\n\nMachine: {machine()}\n\nLoad average at start: {load0}\n")
    print("Protocol: ratios to dense in the same run, variants interleaved, best of "
          f"{a.rounds} rounds; layer decode with cold caches; prefill one 512-token sequence; model decode "
          f"{a.decode} greedy steps after a 16-token prompt (KV cache). Layers: SmolLM2-135M block 15 MLP weights.\n")
    if not a.skip_layers:
        print("## Layers\n")
        print("\n".join(layer_table(dtypes, a.rounds, weights)), flush=True)
        print("\n## Kernel vs dense at batch 1 (time ratio kernel/dense by density)\n")
        print("\n".join(crossover(dtypes, a.rounds)), flush=True)
    if not a.skip_model:
        print("\n## Whole model (SmolLM2-135M)\n")
        with tempfile.TemporaryDirectory() as tmp:
            model_table(model, tok, [getattr(torch, d) for d in a.model_dtypes] if a.model_dtypes else dtypes, a.rounds, a.decode, Path(tmp))  # prints its rows per dtype
    print(f"\nLoad average at end: {load()}; wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Inference cost of compressed SmolLM2 on the CPU: bytes on disk, weights in memory, prefill and decode,
every time against the best dense path, and the memory bandwidth measured in the same run.

    python bench/bench_inference.py                     # everything, one command (several minutes on 2 cores)
    python bench/bench_inference.py --skip-model        # machine, layers and the kernel-vs-density sweep only
    python bench/bench_inference.py --dtypes bfloat16 --rounds 5

Variants, built from SmolLM2-135M's own weights (masks by magnitude, so nothing is calibrated):

- ``dense``: the checkpoint as it is, computed by ``F.linear`` or by the project's dense kernel
  (``factored.kernels.dense_matmul``); **best dense** is the faster of the two, per layer shape (and for the
  whole model, the faster of the two dense models);
- ``wanda50``: 50% unstructured per row (magnitude masks stand in for Wanda's: same shapes and densities);
- ``2:4``: 2 of every 4 inputs kept (magnitude), held in the same bitmask layout;
- ``oats50``: OATS-shaped at compression 0.5, rank_ratio 0.3: S keeps ``oats_budget(...).keep_per_row``
  per row, U [out, r], V [r, in] random (timing only; r from ``sparse_lowrank.common.oats_budget``).

Sparse variants are ``SparseLowRankLinear`` layers (packed values + bitmask; rank 0 for wanda50 and 2:4)
run with a named forward (``factored.forward``): per layer ``bitmask_kernel``, ``densify`` and ``auto``
(the measured choice, no dense copy); whole model ``auto`` (no dense copy) and ``auto+dense``
(``keep_dense=True``: may keep a dense copy where it is faster).

Protocol: every ratio is a speedup, best dense time / variant time, measured in the same run; variants are
interleaved (round robin) and each keeps its best of ``--rounds``. Layer decode (batch 1) is timed cold
(twice the last-level cache is overwritten before each call, as in a whole-model decode step whose
weights do not fit in the cache) and hot (the layer's bytes in the cache). GB/s is the bytes a call must
read (the layer's weights in its layout) over its time; the copy bandwidth at the top is the reference
(STREAM-like: ``dst.copy_(src)`` of 256 MiB, counted as read + write; and a read-only sum). Prefill is one
call of 512 rows (one 512-token sequence), against ``F.linear``. Model decode: 16-token prompt, then
``--decode`` greedy steps with the KV cache, tokens/s; ``lm_head`` (dense in every variant) uses the faster
of ``F.linear`` and the dense kernel, measured once. Bytes on disk: the ``export_model`` files (format
``bitmask``; ``dense`` for the dense row), all files counted. Weights in memory: bytes of every tensor the
model holds, forward caches included.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SHAPES = {(576, 576): "q_proj/o_proj", (192, 576): "k_proj/v_proj", (1536, 576): "gate_proj/up_proj", (576, 1536): "down_proj"}
SWEEP_SHAPES = ((576, 1536), (1536, 576))  # [out, in]: the kernel-vs-density sweep


def machine() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from factored.kernels import failure, isa

    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"kernel SIMD path: {isa() or 'unavailable (' + str(failure()) + ')'}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_warning() -> str:
    one = os.getloadavg()[0]
    return (f"**Load {one:.2f} is above 1.0: the machine is shared and every time below is noisy (rerun idle).**"
            if one > 1.0 else "Load below 1.0: the machine was idle.")


def bandwidth(rounds: int) -> dict[str, float]:
    """Memory bandwidth in bytes/s: copy (read + write of 256 MiB) and read (a sum), best of ``rounds``."""
    n = 64 * 1024 * 1024  # float32 elements: 256 MiB, far above any last-level cache
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best_c = best_r = float("inf")
    for _ in range(max(3, rounds)):
        t = time.perf_counter()
        dst.copy_(src)
        best_c = min(best_c, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        best_r = min(best_r, time.perf_counter() - t)
    return {"copy": 2 * n * 4 / best_c, "read": n * 4 / best_r}


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
        for cache in ("_oats_dense", "_oats_offsets", "_oats_two_four"):
            c = m.__dict__.get(cache)
            if c is not None:
                add(c[1])
    return total


def dense_kernel_forward(lin: nn.Linear) -> None:
    """``lin`` computes with the project's dense kernel for decode-sized inputs (F.linear above 64 rows)."""
    from factored.kernels import dense_matmul

    def fwd(self, x):
        if x.numel() // self.in_features > 64 or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = dense_matmul(self.weight, x)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    lin.forward = types.MethodType(fwd, lin)


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


def layer_bytes(layer) -> int:
    """Bytes a decode call of the layer reads: values, mask, row offsets, U and V (the bias left out)."""
    return sum(t.numel() * t.element_size() for t in (layer.values, layer.mask, layer.U, layer.V)) + 8 * (layer.out_features + 1)


def layer_table(dtypes, rounds: int, weights: dict) -> list[str]:
    from factored.forward import install_auto_forward, run_forward
    from factored.kernels import available, dense_matmul

    rows = ["| dtype | layer [out, in] | variant | forward | bytes / dense | b=1 cold (us) | speedup cold | GB/s cold | "
            "b=1 hot (us) | speedup hot | GB/s hot | prefill 512 (ms) | speedup prefill |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for shape, W in weights.items():
            W = W.to(dtype)
            x1 = torch.randn(1, shape[1]).to(dtype)
            xp = torch.randn(512, shape[1]).to(dtype)
            dense_b = W.numel() * W.element_size()
            fns1 = {("dense", "F.linear"): lambda: F.linear(x1, W)}
            fnsp = {("dense", "F.linear"): lambda: F.linear(xp, W)}
            nbytes = {("dense", "F.linear"): dense_b}
            if available():
                fns1[("dense", "dense_kernel")] = lambda: dense_matmul(W, x1)
                nbytes[("dense", "dense_kernel")] = dense_b
            for variant in ("wanda50", "2:4", "oats50"):
                layer = make_layer(W, variant)
                for impl in ("bitmask_kernel", "densify", "auto"):
                    if impl == "bitmask_kernel" and not available():
                        continue
                    lay = copy.deepcopy(layer)
                    if impl == "auto":
                        install_auto_forward(nn.Sequential(lay))
                        f1, fp = (lambda lay=lay: lay(x1)), (lambda lay=lay: lay(xp))
                    else:
                        f1, fp = (lambda lay=lay, impl=impl: run_forward(lay, x1, impl)), (lambda lay=lay, impl=impl: run_forward(lay, xp, impl))
                    fns1[(variant, impl)], fnsp[(variant, impl)], nbytes[(variant, impl)] = f1, fp, layer_bytes(layer)
                    if impl == "auto":
                        nbytes[(variant, "auto_layer")] = lay
            with torch.no_grad():
                cold = interleaved(fns1, rounds, reps=7, cold=True)
                hot = interleaved(fns1, rounds, reps=30, cold=False)
                pre = interleaved(fnsp, rounds, reps=2, cold=False)
            best_c = min(v for k, v in cold.items() if k[0] == "dense")
            best_h = min(v for k, v in hot.items() if k[0] == "dense")
            rows.append(f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | dense | **best dense** | 1.000 | {best_c * 1e6:.0f} | 1.00 | "
                        f"{dense_b / best_c / 1e9:.1f} | {best_h * 1e6:.0f} | 1.00 | {dense_b / best_h / 1e9:.1f} | "
                        f"{pre[('dense', 'F.linear')] * 1e3:.2f} | 1.00 |")
            for k in fns1:
                name = k[1]
                if k[1] == "auto":
                    ch = nbytes[(k[0], "auto_layer")]._oats_choice
                    name = f"auto ({ch.get(1, '?')} / {ch.get(1024, '?')})"
                b = nbytes[k]
                p = f"{pre[k] * 1e3:.2f} | {pre[('dense', 'F.linear')] / pre[k]:.2f}" if k in pre else "- | -"
                rows.append(f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | {k[0]} | {name} | {b / dense_b:.3f} | "
                            f"{cold[k] * 1e6:.0f} | {best_c / cold[k]:.2f} | {b / cold[k] / 1e9:.1f} | {hot[k] * 1e6:.0f} | "
                            f"{best_h / hot[k]:.2f} | {b / hot[k] / 1e9:.1f} | {p} |")
    return rows


def crossover(dtypes, rounds: int) -> list[str]:
    """Kernel (S only) against the best dense path at batch 1 over densities (speedups); where it reaches 1."""
    from factored.kernels import BitmaskMatrix, available

    if not available():
        return ["kernel unavailable: no sweep"]
    from factored.kernels import dense_matmul

    rows = ["| dtype | layer [out, in] | caches | " + " | ".join(f"{d:g}" for d in DENSITIES) + " | speedup 1 at density |",
            "|---|---|---|" + "---|" * len(DENSITIES) + "---|"]
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for shape in SWEEP_SHAPES:
            W = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
            x = torch.randn(1, shape[1], generator=g).to(dtype)
            mats = {d: BitmaskMatrix.from_dense(W * (torch.rand(*shape, generator=g) < d)) for d in DENSITIES}
            for cold in (True, False):
                fns = {"F.linear": lambda: F.linear(x, W), "dense_kernel": lambda: dense_matmul(W, x)}
                fns.update({d: (lambda m=m: m.matmul(x)) for d, m in mats.items()})
                with torch.no_grad():
                    t = interleaved(fns, rounds, reps=7 if cold else 50, cold=cold)
                ref = min(t["F.linear"], t["dense_kernel"])
                rows.append(_cross_row(dtype, shape, cold, [ref / t[d] for d in DENSITIES]))
    return rows


def _cross_row(dtype, shape, cold, speedups) -> str:
    """One sweep row: the density where the kernel's speedup over best dense falls to 1 (linear interpolation)."""
    cross = None
    for (d0, r0), (d1, r1) in zip(zip(DENSITIES, speedups), zip(DENSITIES[1:], speedups[1:])):
        if cross is None and r0 >= 1 > r1:
            cross = f"{d0 + (r0 - 1) * (d1 - d0) / (r0 - r1):.2f}"
    if cross is None:
        cross = f"> {DENSITIES[-1]}" if speedups[-1] >= 1 else (f"< {DENSITIES[0]}" if speedups[0] < 1 else "none")
    return (f"| {str(dtype).removeprefix('torch.')} | {list(shape)} | {'cold' if cold else 'hot'} | "
            + " | ".join(f"{r:.2f}" for r in speedups) + f" | {cross} |")


# ----------------------------------------------------------------------------------------- model


def _lm_head_policy(model: nn.Module, dtype) -> str:
    """The faster of F.linear and the dense kernel for the (dense) lm_head at batch 1, cold."""
    from factored.kernels import available, dense_matmul

    if not available():
        return "F.linear"
    W = model.lm_head.weight.detach()
    x = torch.randn(1, W.shape[1]).to(dtype)
    with torch.no_grad():
        t = interleaved({"F.linear": lambda: F.linear(x, W), "dense_kernel": lambda: dense_matmul(W, x)}, 2, 5, cold=True)
    return min(t, key=t.get)


def model_table(base: nn.Module, tok, dtypes, rounds: int, n_decode: int, tmp: Path) -> list[str]:
    from export import export_model
    from factored.forward import forward_record, install_auto_forward
    from factored.kernels import available
    from oats.architectures import get_blocks, linear_layers

    rows = ["| dtype | variant | forward | bytes on disk (MB) | / dense | weights in memory (MB) | / dense | prefill 512 (s) | speedup prefill | "
            "decode tok/s | speedup decode | forwards chosen |",
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

    for dtype in dtypes:
        dense = copy.deepcopy(base).to(dtype).eval()
        head = _lm_head_policy(dense, dtype)
        models = {("dense", "F.linear"): dense}
        if available():
            dk = copy.deepcopy(dense)
            for block in get_blocks(dk):
                for lin in linear_layers(block).values():
                    dense_kernel_forward(lin)
            models[("dense", "dense_kernel")] = dk
        disk = {}
        d = tmp / "dense"
        disk["dense"] = export_model(dense, d, "dense")["total"]["file_bytes"]
        shutil.rmtree(d)
        for variant in ("wanda50", "2:4", "oats50"):
            m = compress_model(copy.deepcopy(dense), variant)
            d = tmp / variant.replace(":", "")
            disk[variant] = export_model(m, d, "bitmask")["total"]["file_bytes"]
            shutil.rmtree(d)
            for pol in ("auto", "auto+dense"):
                mm = m if pol == "auto+dense" else copy.deepcopy(m)
                install_auto_forward(mm, keep_dense=pol == "auto+dense")
                models[(variant, pol)] = mm
            gc.collect()
        if head == "dense_kernel":
            for mm in models.values():
                dense_kernel_forward(mm.lm_head)
        for mm in models.values():  # warm-up: calibrations, caches
            decode(mm, 2)
            prefill(mm)
        best_p = {k: float("inf") for k in models}
        best_d = dict(best_p)
        for _ in range(rounds):
            for k, mm in models.items():
                t = time.perf_counter()
                prefill(mm)
                best_p[k] = min(best_p[k], time.perf_counter() - t)
                best_d[k] = min(best_d[k], decode(mm, n_decode))
        ref_d = min(v for k, v in best_d.items() if k[0] == "dense")
        ref_p = min(v for k, v in best_p.items() if k[0] == "dense")
        mem_dense = resident_bytes(dense)
        name = str(dtype).removeprefix("torch.")
        rows.append(f"| {name} | dense | **best dense** | {disk['dense'] / 1e6:.1f} | 1.000 | {mem_dense / 1e6:.0f} | 1.00 | {ref_p:.2f} | 1.00 | "
                    f"{1 / ref_d:.2f} | 1.00 | lm_head: {head} |")
        for k, mm in models.items():
            mem = resident_bytes(mm)
            rec = forward_record(mm)["summary"] if k[0] != "dense" else ""
            rows.append(f"| {name} | {k[0]} | {k[1]} | {disk[k[0]] / 1e6:.1f} | {disk[k[0]] / disk['dense']:.3f} | "
                        f"{mem / 1e6:.0f} | {mem / mem_dense:.3f} | {best_p[k]:.2f} | {ref_p / best_p[k]:.2f} | {1 / best_d[k]:.2f} | "
                        f"{ref_d / best_d[k]:.2f} | {rec} |")
        print("\n".join(rows if dtype == dtypes[0] else rows[-len(models) - 1:]), flush=True)  # as each dtype finishes
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
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--model-dtypes", nargs="+", default=None, help="dtypes of the whole-model table (default: --dtypes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtypes = [getattr(torch, d) for d in a.dtypes]
    from oats.models import load_model

    t0 = time.time()
    load0 = load()
    warn = load_warning()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    model, tok = load_model("smollm2-135m", "float32")
    blk = model.model.layers[15]
    weights = {(576, 576): blk.self_attn.q_proj.weight, (192, 576): blk.self_attn.k_proj.weight,
               (1536, 576): blk.mlp.up_proj.weight, (576, 1536): blk.mlp.down_proj.weight}
    weights = {k: v.detach().clone() for k, v in weights.items()}
    print(f"# bench_inference\n\nCommit: {commit or '?'}\n\nMachine: {machine()}\n\nLoad average at start: {load0}. {warn}\n")
    bw = bandwidth(a.rounds)
    print(f"Memory bandwidth ({torch.get_num_threads()} threads): copy {bw['copy'] / 1e9:.1f} GB/s (read + write), "
          f"read {bw['read'] / 1e9:.1f} GB/s. A decode kernel bound by memory reaches about the read figure cold.\n")
    print("Protocol: speedups = best dense time / time, in the same run, variants interleaved, best of "
          f"{a.rounds} rounds; best dense = the faster of F.linear and the dense kernel per shape; prefill one 512-token "
          f"sequence (against F.linear); model decode {a.decode} greedy steps after a 16-token prompt (KV cache). "
          "Layers: SmolLM2-135M block 15 weights.\n", flush=True)
    if not a.skip_layers:
        print("## Layers\n")
        print("\n".join(layer_table(dtypes, a.rounds, weights)), flush=True)
    if not a.skip_sweep:
        print("\n## Bitmask kernel against the best dense path at batch 1, by density (speedups)\n")
        print("\n".join(crossover(dtypes, a.rounds)), flush=True)
    if not a.skip_model:
        print("\n## Whole model (SmolLM2-135M)\n")
        with tempfile.TemporaryDirectory() as tmp:
            model_table(model, tok, [getattr(torch, d) for d in a.model_dtypes] if a.model_dtypes else dtypes, a.rounds, a.decode, Path(tmp))
    print(f"\nLoad average at end: {load()}. {load_warning()} Wall time {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()

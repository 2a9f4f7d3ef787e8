"""Peak CPU memory of compressing a model loaded whole vs. streamed lazily from its safetensors shards.

    python bench/bench_memory.py                      # SmolLM2-135M, wanda 50%, 16 x 256 pydoc tokens
    python bench/bench_memory.py --method magnitude --nsamples 32 --seqlen 512

Each variant runs in a fresh subprocess (so nothing is shared or cached between them) and reports its
own peak resident set size (``ru_maxrss``):

- ``baseline``: imports, tokenizer and the calibration windows only (the interpreter + torch floor);
- ``whole``:    ``load_model`` (all weights in memory), capture, compress every block in memory;
- ``lazy``:     ``oats.weights``: meta-device skeleton, each block read from the shards just before it is
                compressed, written to its own output shard and freed (the ``lazy_load: True`` path).

No evaluation in either variant: the numbers isolate compression. Prints the machine, the protocol and
a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(variant: str, args: argparse.Namespace) -> dict:
    import torch

    from data import calibration_windows
    from oats.compressor import compress_model
    from oats.config import resolve
    from oats.models import load_model, model_path
    from oats.pipeline import capture_inputs

    torch.set_num_threads(args.threads)
    cfg = resolve(dict(model=args.model, method=args.method, sparsity=0.5, cal_dataset=args.dataset,
                       cal_nsamples=args.nsamples, cal_seqlen=args.seqlen, cal_batch_size=args.batch, device="cpu"))
    src = Path(model_path(cfg.model))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tok, cfg.cal_dataset, cfg.cal_nsamples, cfg.cal_seqlen, cfg.cal_sampler, cfg.seed, cfg.data_dir)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    if variant == "whole":
        model, _ = load_model(cfg.model, cfg.dtype)
        inputs = capture_inputs(model, ids, cpu, cfg.cal_batch_size)
        n = len(compress_model(model, inputs, cfg, cpu, [cfg.sparsity] * model.config.num_hidden_layers))
    elif variant == "lazy":
        from oats.weights import LazyModel, ShardWriter

        lazy = LazyModel.from_dir(src, cfg.dtype)
        lazy.load_head()
        inputs = capture_inputs(lazy.model, ids, cpu, cfg.cal_batch_size)
        lazy.free_head()
        out = Path(tempfile.mkdtemp(prefix="oats-bench-lazy-"))
        writer = ShardWriter(out, lazy)

        def after(i, block, _next):
            writer.write_block(i, block)
            lazy.free_block(i)

        n = len(compress_model(lazy.model, inputs, cfg, cpu, [cfg.sparsity] * lazy.n_blocks,
                               after_block=after, before_block=lazy.load_block))
        writer.write_rest_and_index(src, tok)
        import shutil

        shutil.rmtree(out)
    else:
        n = 0
    return {"variant": variant, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0, "layers": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="wanda")
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="baseline,whole,lazy")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return

    from oats.weights import ShardedWeights
    from oats.models import model_path

    src = Path(model_path(args.model))
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    sw = ShardedWeights(src)
    import torch

    meta = {}
    from safetensors import safe_open

    for fname in sorted(set(sw.file_of.values())):
        with safe_open(str(src / fname), framework="pt") as h:
            for k in h.keys():
                meta[k] = h.get_slice(k).get_shape()
    numel = lambda names: sum(int(torch.tensor(meta[n]).prod()) for n in names)  # noqa: E731
    block0 = numel([n for n in meta if ".layers.0." in n])
    rest = numel([n for n in meta if ".layers." not in n])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"protocol: {args.model} float32 on CPU, {args.method} 50% unstructured, calibration {args.nsamples} x {args.seqlen} "
          f"{args.dataset} tokens (batch {args.batch}), {args.threads} threads, no evaluation; each variant a fresh process, peak = ru_maxrss")
    print(f"model: {src} ({size / 2**20:.0f} MiB of safetensors; one block {block0 * 4 / 2**20:.1f} MiB, "
          f"embeddings/norm/head {rest * 4 / 2**20:.1f} MiB in float32)")
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v] + [a for a in sys.argv[1:] if not a.startswith("--variants")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:])
            raise SystemExit(f"variant {v} failed")
        rows.append(json.loads(line[0][7:]))
    base = next((r["peak_rss_mib"] for r in rows if r["variant"] == "baseline"), 0.0)
    print("\n| variant | peak RSS (MiB) | above baseline (MiB) | compress time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - base:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()

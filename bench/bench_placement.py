"""Dense token perplexity of a model evaluated in memory and placed with disk offload (``device_map``),
side by side: perplexity, peak resident memory, seconds.

    python bench/bench_placement.py                          # SmolLM2-135M, 8 x 256 pydoc tokens, cpu budget 40MiB
    python bench/bench_placement.py --seqlen 512 --windows 16 --max-memory 200MiB

Each variant is one ``python main.py`` run in a fresh process (started through a shell that forks, so it
does not inherit this process's peak RSS) with its own output folder; the numbers come from its
result record (``metrics.ppl``, ``peak_memory_mb.cpu_rss``, ``timings``):

- ``memory``:      the model loaded whole, evaluated in memory (no device map);
- ``memory-disk``: loaded whole, then dispatched with ``device_map: auto`` and ``max_memory: {cpu: ...}``:
                   what does not fit is written to ``<out>/<name>/offload`` and read back module by module;
- ``lazy-disk``:   ``lazy_load`` with the same map: built on the meta device, the weights mapped to disk
                   read from the checkpoint's own shards when their module runs (nothing loaded whole).

Prints the machine (CPU model, cores, torch), the load average before and after, and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "memory": {},
    "memory-disk": {"device_map": "auto"},
    "lazy-disk": {"device_map": "auto", "lazy_load": True},
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_variant(name: str, over: dict, args: argparse.Namespace, out: Path) -> dict:
    if "device_map" in over:
        over = {**over, "max_memory": {"cpu": args.max_memory}}
    exp = dict(model=args.model, method="dense", name=name, eval_datasets=[args.dataset], eval_seqlen=args.seqlen,
               eval_max_windows=args.windows, eval_batch_size=args.batch, device="cpu", threads=args.threads, **over)
    cfg = out / f"{name}.py"
    cfg.write_text(textwrap.dedent(f"""
        from ml_collections import ConfigDict
        CONFIGS = [ConfigDict({exp!r})]
    """))
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "--out", str(out / "runs")]
    proc = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True, text=True, cwd=ROOT)
    path = out / "runs" / name / "result.json"
    if proc.returncode or not path.is_file():
        print(proc.stderr[-3000:])
        raise SystemExit(f"variant {name} failed")
    rec = json.loads(path.read_text())
    if rec.get("status") != "ok":
        raise SystemExit(f"variant {name}: {rec.get('error')}")
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-memory", default="40MiB", help="the CPU budget of the placed variants")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    import torch

    load_before = os.getloadavg()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"load average before (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_before)}")
    print(f"protocol: {args.model} dense float32 on the CPU, token perplexity on {args.windows} x {args.seqlen} {args.dataset} tokens "
          f"(batch {args.batch}), {args.threads} threads; placed variants: device_map auto, max_memory {{cpu: {args.max_memory}}}; "
          f"each variant a fresh `python main.py` process")
    rows = []
    with tempfile.TemporaryDirectory(prefix="oats-bench-placement-") as tmp:
        for name in args.variants.split(","):
            rec = run_variant(name, VARIANTS[name], args, Path(tmp))
            placement = rec.get("placement") or {}
            rows.append((name, rec["metrics"]["ppl"][args.dataset], rec["peak_memory_mb"]["cpu_rss"], rec["timings"]["evaluation"],
                         rec["timings"]["total"], placement.get("blocks", {}), placement.get("offload_dir", "-")))
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| variant | ppl | peak RSS (MiB) | evaluation (s) | total (s) | blocks by device | offload folder |")
    print("|---|---|---|---|---|---|---|")
    for name, ppl, rss, ev, total, blocks, folder in rows:
        where = ", ".join(f"{d} {n}" for d, n in blocks.items()) or "all in memory"
        shown = "the checkpoint's shards" if folder is None else ("-" if folder == "-" else "<out>/<name>/offload")
        print(f"| {name} | {ppl:.4f} | {rss:.0f} | {ev:.1f} | {total:.1f} | {where} | {shown} |")


if __name__ == "__main__":
    main()

"""Zero-shot accuracy of one model on the paper tasks from the local task files (the README's benchmark run).

    python -m tools.zero_shot_dense                                    # dense SmolLM2, README protocol
    python -m tools.zero_shot_dense --model results/oats-50/model      # any saved (compressed) model directory
    python -m tools.zero_shot_dense --tasks rte,piqa --limit boolq=500 --out /tmp/zs.json

Each task runs on its own (so a per-task limit is possible) and the JSON is rewritten after every task,
so a long run that is stopped keeps what it finished. Printed next to the numbers: the machine, lm_eval
version, batch size, limits and the files read. For compressed models inside the pipeline, use config key
``zero_shot_tasks`` instead (no save/reload); this script is for saved or dense models.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from data.files import atomic_write_text
from eval.zero_shot import PAPER_TASKS, make_lm, run_lm_eval, summarize_zero_shot, task_entries

# Order: cheapest first, so a stopped run has the most tasks.
DEFAULT_ORDER = ("rte", "openbookqa", "winogrande", "arc_challenge", "piqa", "boolq", "hellaswag", "arc_easy")


def parse_limits(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=")
        if k not in PAPER_TASKS:
            raise SystemExit(f"--limit: unknown task {k!r}; allowed: {PAPER_TASKS}")
        out[k] = int(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="embedded name or a local model directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--data-dir", default=os.environ.get("OATS_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--tasks", default=",".join(DEFAULT_ORDER))
    p.add_argument("--limit", default="boolq=500,hellaswag=500", help="per-task example caps, e.g. boolq=500 (others: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="/tmp/zero_shot_dense.json")
    args = p.parse_args()

    from oats.models import load_model

    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in PAPER_TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {bad}; allowed: {PAPER_TASKS}")
    limits = parse_limits(args.limit)
    torch.manual_seed(0)
    model, tok = load_model(args.model, args.dtype)
    lm = make_lm(model, tok, args.batch_size)
    protocol = {
        "model": args.model, "dtype": args.dtype, "device": "cpu", "batch_size": args.batch_size, "fewshot": 0,
        "limits": limits, "data_dir": args.data_dir, "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}", "python": platform.python_version(),
        "torch": torch.__version__, "lm_eval": __import__("lm_eval").__version__,
    }
    print("protocol:", json.dumps(protocol))
    record = {"protocol": protocol, "zero_shot": {}, "info": {}, "seconds": {}}
    for task in tasks:
        t0 = time.perf_counter()
        raw = run_lm_eval(lm, task_entries([task], Path(args.data_dir)), limit=limits.get(task), num_fewshot=0, offline=True)
        scores, info = summarize_zero_shot(raw)
        for name, value in scores.items():
            if name == "mean":
                continue
            record["zero_shot"][name] = value
            record["info"][name] = {"metric": info["metric"][name], "acc": info["acc"][name],
                                    "acc_norm": info["acc_norm"][name], "n": info["n"][name],
                                    "approximate": name in info["approximate"]}
            record["seconds"][name] = time.perf_counter() - t0
            print(f"{name:18s} {info['metric'][name]:8s} {value:.4f}  n={info['n'][name]}  {time.perf_counter() - t0:.0f}s", flush=True)
        vals = list(record["zero_shot"].values())
        record["mean"] = sum(vals) / len(vals)
        atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(f"mean over {len(record['zero_shot'])} tasks: {record['mean']:.4f}; written {args.out}")


if __name__ == "__main__":
    main()

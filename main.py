"""oats: run the experiment list of OATS_configs.py (or --config FILE.py) and write results.

    python main.py                       # every experiment of OATS_configs.py not done yet -> results/OATS_configs/
    python main.py --config my.py --only oats-50 --out runs/
    python main.py --list                # each experiment and whether it is done (done / failed / stale / pending)
    python main.py --plan                # each experiment's planned peak memory, before anything loads
    python main.py --slurm --partition gpu --gpus 1 --time 240 --mem 64   # one SLURM array, a task per experiment
    python main.py --report --out runs/  # tables (md, csv, tex) + plots of every result under runs/report/
    python main.py --export oats-50 --format peft   # a saved experiment (save_model: true) as PEFT, bitmask or dense
"""
from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("oats")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="OATS_configs.py", help="Python file defining CONFIGS, a list of ConfigDicts")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only the experiment(s) of this name")
    p.add_argument("--index", type=int, action="append", default=[], metavar="I", help="run only the experiment(s) at this index")
    p.add_argument("--out", default=None, help="results root (default: results/<config file stem>/)")
    p.add_argument("--list", action="store_true", help="print the experiments and whether each is done, then exit")
    p.add_argument("--force", action="store_true", help="rerun experiments even when their result exists")
    p.add_argument("--report", action="store_true", help="write tables and plots of all results under <out>/report/, then exit")
    p.add_argument("--plan", action="store_true", help="print each experiment's planned peak memory (nothing loads), then exit")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="with --plan: the memory of one GPU to plan against (e.g. 80GiB; default: this machine's first GPU)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    e = p.add_argument_group("export a saved model (an experiment run with save_model: true, or any saved model folder)")
    e.add_argument("--export", metavar="NAME|DIR", default=None,
                   help="the experiment under --out to export (or a folder holding a saved model's config.json), then exit")
    e.add_argument("--to", metavar="DIR", default=None, help="where to write it (default <out>/<NAME>/export; required for a folder)")
    e.add_argument("--format", choices=("bitmask", "peft", "dense"), default="bitmask",
                   help="bitmask: values + 1-bit mask (stock transformers, trust_remote_code); peft: sparse base + LoRA adapter; dense")
    e.add_argument("--base-format", choices=("bitmask", "dense"), default="bitmask", help="with --format peft: how the sparse base is stored")
    e.add_argument("--no-nm", action="store_true", help="never store a weight in the N:M layout (bitmask or dense only)")
    s = p.add_argument_group("cluster (submitit; defaults from a SLURM dict in the config file)")
    s.add_argument("--slurm", action="store_true", help="submit the selected, not yet done experiments as one job array (one experiment per task)")
    s.add_argument("--slurm-executor", choices=("slurm", "local", "debug"), default=None, help="slurm (sbatch, default), local (subprocesses here) or debug (this process)")
    s.add_argument("--slurm-local", action="store_const", const="local", dest="slurm_executor", help="same as --slurm-executor local")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--gpus", type=int, default=None, help="GPUs per task (default 1)")
    s.add_argument("--time", type=int, default=None, help="minutes per task (default 240)")
    s.add_argument("--mem", type=float, default=None, help="GB of CPU memory per task (default 64)")
    s.add_argument("--cpus", type=int, default=None, help="CPU cores per task (default 8)")
    s.add_argument("--array-parallelism", type=int, default=None, help="array tasks running at once (default 16)")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--qos", default=None, help="SLURM quality of service")
    s.add_argument("--constraint", default=None, help="SLURM node constraint")
    s.add_argument("--slurm-folder", default=None, help="submitit logs and pickles (default <out>/slurm)")
    s.add_argument("--wait", action="store_true", help="with --slurm: wait for the array and report each task")
    return p.parse_args(argv)


def load_configs(path: str) -> list:
    from oats.config import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError("--config", f"{path!r} is not a file")
    try:
        namespace = runpy.run_path(str(file))
    except SyntaxError as e:
        raise ConfigError("--config", f"{path} line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        import traceback

        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == str(file)), "?")
        raise ConfigError("--config", f"{path} line {line}: {type(e).__name__}: {e}") from None
    if "CONFIGS" not in namespace:
        raise ConfigError("CONFIGS", f"{path} must define CONFIGS, a list of ml_collections.ConfigDict")
    return namespace["CONFIGS"]


def default_out(config_path: str) -> Path:
    """results/<config file stem>: lists of different files never share (or stale) each other's folders."""
    return Path("results") / Path(config_path).stem


def select(cfgs: list, only: list[str], index: list[int]) -> list:
    from oats.config import ConfigError

    if not only and not index:
        return cfgs
    names = {c.name for c in cfgs}
    for n in only:
        if n not in names:
            raise ConfigError("--only", f"no experiment named {n!r}; names: {sorted(names)}")
    for i in index:
        if not 0 <= i < len(cfgs):
            raise ConfigError("--index", f"{i} is out of range; the list has {len(cfgs)} experiments (0..{len(cfgs) - 1})")
    return [c for i, c in enumerate(cfgs) if c.name in only or i in index]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "fsspec", "datasets", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out) if args.out else default_out(args.config)
    if args.report:
        return _report(out)
    if args.export:
        return _export(args, out)
    from oats.config import ConfigError, resolve_all

    try:
        all_cfgs = resolve_all(load_configs(args.config))
        cfgs = select(all_cfgs, args.only, args.index)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from oats.sweep import STATUSES, run_all, status_of

    if args.plan:
        from oats.placement import memory_problem

        problem = memory_problem({"cpu": args.gpu_memory}) if args.gpu_memory is not None else None
        if problem:
            print(f"error: --gpu-memory: {problem.split(': ', 1)[1]}", file=sys.stderr)
            return 2
        return _plan(cfgs, args.gpu_memory)
    if args.list:
        from oats.checkpoint import describe

        for i, c in enumerate(cfgs):
            status = status_of(c, out)
            partial = describe(out / c.name) if status != "done" else None
            print(f"{i:3d}  {status:8s}  {c.name}" + (f"  ({partial})" if partial else ""))
        print("statuses: " + "; ".join(f"{k} = {v}" for k, v in STATUSES.items()) + f" (results in {out}/)")
        return 0
    try:
        from oats.preflight import preflight

        preflight(cfgs, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.slurm:
        return _submit(args, all_cfgs, cfgs, out)
    try:
        outcome = run_all(cfgs, out, force=args.force)
    except KeyboardInterrupt:
        done = sum(status_of(c, out) == "done" for c in cfgs)
        again = " ".join(["python", "main.py", *(argv if argv is not None else sys.argv[1:])])
        print(f"\ninterrupted: {done} of {len(cfgs)} experiments done (results in {out}/); run `{again}` again to resume "
              f"(finished experiments are skipped{', checkpointed blocks reused' if any(c.checkpoint_blocks for c in cfgs) else ''})",
              file=sys.stderr)
        return 130
    failed = [n for n, s in outcome.items() if s == "failed"]
    print_results(cfgs, out)
    log.info("finished: %d ok, %d skipped, %d failed, %d busy; results in %s/ (summary.md; tables and plots: "
             "python main.py --report --out %s)", sum(s == "ok" for s in outcome.values()), sum(s == "skipped" for s in outcome.values()),
             len(failed), sum(s == "busy" for s in outcome.values()), out, out)
    return 1 if failed else 0


def print_results(cfgs: list, out: Path) -> None:
    """The results table of the selected experiments, on the console."""
    from eval.report import summary_markdown
    from oats.records import experiment_dir, read_record

    records = [r for c in cfgs if (r := read_record(experiment_dir(out, c.name))) is not None]
    if records:
        print("\n" + summary_markdown(records))


def _export(args: argparse.Namespace, out: Path) -> int:
    """Write a saved model in an exchange format and print its bytes against dense."""
    given = Path(args.export)
    if (given / "config.json").is_file():  # a saved model folder
        if not args.to:
            print(f"error: --to: exporting the folder {given} needs --to DIR", file=sys.stderr)
            return 2
        model_dir, to, name = given, Path(args.to), str(given)
    else:  # an experiment under --out
        model_dir, name = out / args.export / "model", args.export
        to = Path(args.to) if args.to else out / args.export / "export"
        if not (model_dir / "config.json").is_file():
            print(f"error: --export: {out / args.export} has no saved model ({model_dir}/config.json) and {given} is no saved "
                  "model folder; run the experiment with save_model: true", file=sys.stderr)
            return 2
    from export import export_from_dir

    try:
        report = export_from_dir(model_dir, to, args.format, nm=None if args.no_nm else "auto", base_format=args.base_format)
    except ValueError as e:
        print(f"error: --export: {e}", file=sys.stderr)
        return 2
    total = report.get("total", {})
    log.info("exported %s as %s to %s: %s bytes of tensors, %.3fx the dense checkpoint in the same dtype", name, args.format, to,
             total.get("tensor_bytes"), total.get("ratio", float("nan")))
    print(json.dumps(total, indent=1))
    return 0


def _plan(cfgs: list, gpu_memory: str | None = None) -> int:
    """The memory plan of the selected experiments against this machine's memory and a GPU's (``--gpu-memory``,
    else this machine's first GPU); 1 when one does not fit."""
    import torch

    from oats.placement import memory_bytes
    from oats.plan import _human, gpu_peak, machine_memory, plan_experiment, plan_markdown, remedies

    plans = [plan_experiment(c) for c in cfgs]
    limit = machine_memory()
    gpu_limit = (memory_bytes({"cpu": gpu_memory})["cpu"] if gpu_memory else
                 torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0)
    print(plan_markdown(plans))
    print(f"\nthis machine: {_human(limit)} of memory" if limit else "\nthis machine's memory is unknown",
          f"; a GPU: {_human(gpu_limit)}" if gpu_limit else "; no GPU (--gpu-memory SIZE plans against one)", sep="")
    too_big = [(c, p) for c, p in zip(cfgs, plans) if limit and p.cpu_peak > limit]
    for c, p in too_big:
        fixes = remedies(c, limit)
        print(f"{c.name}: needs {_human(p.cpu_peak)}, more than {_human(limit)}; "
              + (f"fits with {' or '.join(fixes)}" if fixes else "no single key change makes it fit"))
    too_big_gpu = [(c, p) for c, p in zip(cfgs, plans) if gpu_limit and gpu_peak(p) > gpu_limit]
    for c, p in too_big_gpu:
        fixes = remedies(c, gpu_limit, gpu=True)
        print(f"{c.name}: needs {_human(gpu_peak(p))} on one GPU, more than {_human(gpu_limit)}; "
              + (f"fits with {' or '.join(fixes)}" if fixes else "no single key change makes it fit"))
    return 1 if too_big or too_big_gpu else 0


def _report(out: Path) -> int:
    from oats.records import all_records, report

    if not all_records(out):
        print(f"error: no result records under {out}/ (looked for {out}/*/result.json); run the experiments first or pass --out", file=sys.stderr)
        return 2
    for kind, path in report(out).items():
        print(f"{kind:24s} {path}")
    return 0


def _submit(args: argparse.Namespace, all_cfgs: list, cfgs: list, out: Path) -> int:
    """--slurm: the selected experiments not done yet become one submitit job array."""
    from oats.config import ConfigError
    from oats.sweep import status_of
    from oats.slurm import file_options, make_options, submit

    try:
        opts = make_options(file_options(args.config), executor=args.slurm_executor, partition=args.partition, gpus=args.gpus,
                            time=args.time, mem=args.mem, cpus=args.cpus, array_parallelism=args.array_parallelism,
                            account=args.account, qos=args.qos, constraint=args.constraint, folder=args.slurm_folder)
        wanted = [c for c in cfgs if args.force or status_of(c, out) != "done"]
        jobs = submit(args.config, wanted, out, opts, force=args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("submitted %d experiment(s) (%d done already); `python main.py --list --out %s` shows progress",
             len(jobs), len(cfgs) - len(jobs), out)
    if not args.wait:
        return 0
    failed = 0
    for c, job in zip(wanted, jobs):
        try:
            outcome = job.result()
        except Exception as e:  # the task itself died (timeout, out of memory...)
            outcome = {c.name: f"task error: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"}
        failed += any(v not in ("ok", "skipped") for v in outcome.values())
        log.info("job %s: %s", job.job_id, outcome)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps on a SLURM cluster through submitit: the selected experiments become one job array, one
experiment per array task; each task runs ``run_all`` on its experiment, so results land in the very
layout a local run writes (``<out>/<name>/result.json``) and ``python main.py --list`` shows them.

    python main.py --slurm --partition gpu --gpus 1 --time 240 --mem 64 --cpus 8 --array-parallelism 16
    python main.py --slurm --slurm-executor local      # same submission, run as local processes

Options come from a ``SLURM = dict(partition=..., gpus=...)`` in the config file, overridden by the
command line; :data:`OPTIONS` lists them with defaults. ``executor`` is ``slurm`` (sbatch), ``local``
(submitit's LocalExecutor: subprocesses on this machine) or ``debug`` (in this process, for pdb).
"""
from __future__ import annotations

import logging
import os
import runpy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from oats.config import ConfigError

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SlurmOptions:
    """What to ask the scheduler for, per array task (one experiment)."""

    executor: str = "slurm"
    partition: str | None = None
    gpus: int = 1  # GPUs per task (per node; one node per task)
    time: int = 240  # minutes before SLURM kills the task
    mem: float = 64.0  # GB of CPU memory per task
    cpus: int = 8  # CPU cores per task
    array_parallelism: int = 16  # array tasks running at once
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "oats"
    folder: str | None = None  # submitit logs and pickles; default <out>/slurm
    setup: tuple[str, ...] = ()  # shell lines run before each SLURM task (module load, conda activate...); not locally


OPTIONS = {f.name: f.default for f in fields(SlurmOptions)}
_INT = ("gpus", "time", "cpus", "array_parallelism")


def make_options(file_options: dict[str, Any] | None = None, **cli: Any) -> SlurmOptions:
    """Merge the config file's ``SLURM`` dict and command-line values (those not None) and validate."""
    merged: dict[str, Any] = dict(file_options or {})
    unknown = sorted(set(merged) - set(OPTIONS))
    if unknown:
        raise ConfigError("SLURM", f"unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    merged.update({k: v for k, v in cli.items() if v is not None})
    opts = {**OPTIONS, **merged}
    if opts["executor"] not in EXECUTORS:
        raise ConfigError("--slurm-executor", f"got {opts['executor']!r}; allowed values: {', '.join(map(repr, EXECUTORS))}")
    for k in _INT:
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "gpus" else 1):
            raise ConfigError(f"--{k.replace('_', '-')}", f"got {v!r}; must be an integer >= {0 if k == 'gpus' else 1}")
    if isinstance(opts["mem"], bool) or not isinstance(opts["mem"], (int, float)) or opts["mem"] <= 0:
        raise ConfigError("--mem", f"got {opts['mem']!r}; must be a number of GB > 0")
    if isinstance(opts["setup"], str):
        opts["setup"] = (opts["setup"],)
    opts["setup"] = tuple(opts["setup"])
    return SlurmOptions(**opts)


def _setup_lines(opts: SlurmOptions, cluster: bool = True) -> list[str]:
    # The task unpickles oats.slurm.run_task, so the repository must be importable wherever it runs.
    return [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *(opts.setup if cluster else ())]


def sbatch_parameters(opts: SlurmOptions) -> dict[str, Any]:
    """The parameters handed to submitit's SlurmExecutor (its names: ``time`` in minutes, ``mem`` as '64GB')."""
    params: dict[str, Any] = {
        "job_name": opts.job_name,
        "time": opts.time,
        "mem": f"{int(opts.mem)}GB" if float(opts.mem).is_integer() else f"{int(opts.mem * 1024)}MB",
        "cpus_per_task": opts.cpus,
        "nodes": 1,
        "ntasks_per_node": 1,
        "array_parallelism": opts.array_parallelism,
        "setup": _setup_lines(opts),
    }
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    return params


def render_sbatch(opts: SlurmOptions, n_tasks: int, folder: str | Path = "slurm") -> str:
    """The sbatch script submitit writes for an array of ``n_tasks`` experiments under these options."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="python -u -m submitit.core._submit <folder>", folder=Path(folder) / "%j",
                               map_count=n_tasks, **sbatch_parameters(opts))


def make_executor(opts: SlurmOptions, folder: str | Path):
    """A submitit executor for ``opts.executor``; logs and pickles go to ``folder/%j``."""
    import submitit

    folder = Path(folder) / "%j"
    if opts.executor == "slurm":
        from submitit.slurm.slurm import SlurmExecutor

        try:
            ex = SlurmExecutor(folder=folder)
        except RuntimeError as e:
            raise ConfigError("--slurm-executor", f"'slurm' needs a SLURM cluster ({e}); use --slurm-executor local to run the array here") from e
        ex.update_parameters(**sbatch_parameters(opts))
        return ex
    ex = submitit.LocalExecutor(folder=folder) if opts.executor == "local" else submitit.DebugExecutor(folder=folder)
    params: dict[str, Any] = {"timeout_min": opts.time}
    if opts.executor == "local":
        params["setup"] = _setup_lines(opts, cluster=False)
    ex.update_parameters(**params)
    return ex


def with_task_gpus(cfg: Any, gpus: int | None = None) -> Any:
    """A task given several GPUs (``--gpus N``) uses them: an experiment that names no ``device_map``
    is evaluated placed across them (``device_map: 'auto'``, not hashed: the numbers are the same).
    Compression streams one block on ``device`` either way; vision models are not placed."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    from oats.config import is_vision_config

    if gpus > 1 and cfg.get("device_map") is None and cfg.get("device") != "cpu" and not is_vision_config(cfg):
        cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else dict(cfg)
        cfg["device_map"] = "auto"
        log.info("%d GPUs: %s is evaluated placed across them (device_map 'auto')", gpus, cfg["name"])
    return cfg


def run_task(config_path: str, name: str, cfg_hash: str, out_root: str, force: bool = False) -> dict[str, str]:
    """One array task: run the experiment called ``name`` of the config file, and only if its config
    still has the hash it had at submission. The file is read again when the task starts (it may wait
    in the queue for days): an experiment renamed, removed or changed since is refused, never another
    one run in its place."""
    from oats.config import config_hash, resolve_all
    from oats.sweep import run_all

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfgs = {c.name: c for c in resolve_all(runpy.run_path(config_path)["CONFIGS"])}
    if name not in cfgs:
        raise ConfigError("name", f"array task for experiment {name!r}: {config_path} no longer has it (edited since submission); nothing run")
    cfg = cfgs[name]
    if config_hash(cfg) != cfg_hash:
        raise ConfigError("name", f"array task for experiment {name!r}: its config in {config_path} changed since submission "
                                  f"(hash {config_hash(cfg)}, submitted {cfg_hash}); nothing run, submit again")
    cfg = with_task_gpus(cfg)
    log.info("array task: experiment %s (hash %s, SLURM_ARRAY_TASK_ID=%s, CUDA_VISIBLE_DEVICES=%s); submitted as "
             "run_task(%r, %r, %r, %r, force=%s)", name, cfg_hash, os.environ.get("SLURM_ARRAY_TASK_ID"),
             os.environ.get("CUDA_VISIBLE_DEVICES"), config_path, name, cfg_hash, out_root, force)
    try:
        from oats.plan import plan_markdown, plan_experiment

        log.info("memory plan of %s:\n%s", name, plan_markdown([plan_experiment(cfg)]))
    except Exception as e:  # the plan is for the log; a model whose config cannot be read here is reported by the run
        log.info("memory plan of %s: not available (%s: %s)", name, type(e).__name__, e)
    return run_all([cfg], Path(out_root), force=force)


def file_options(config_path: str | Path) -> dict[str, Any]:
    """The ``SLURM`` dict of a config file (empty when it defines none)."""
    opts = runpy.run_path(str(config_path)).get("SLURM", {})
    if not isinstance(opts, dict):
        raise ConfigError("SLURM", f"must be a dict of options {sorted(OPTIONS)}, got {type(opts).__name__}")
    return opts


def submit(config_path: str | Path, cfgs: Sequence[Any], out_root: str | Path, opts: SlurmOptions, force: bool = False) -> list:
    """Submit the resolved experiments ``cfgs`` of ``config_path`` as one array, one task each; each task
    carries its experiment's name and config hash (see :func:`run_task`). Returns the jobs."""
    from oats.config import config_hash

    if not cfgs:
        return []
    config_path, out_root = Path(config_path).resolve(), Path(out_root).resolve()
    folder = Path(opts.folder).resolve() if opts.folder else out_root / "slurm"
    ex = make_executor(opts, folder)
    n = len(cfgs)
    jobs = ex.map_array(run_task, [str(config_path)] * n, [c.name for c in cfgs], [config_hash(c) for c in cfgs],
                        [str(out_root)] * n, [force] * n)
    for c, job in zip(cfgs, jobs):
        log.info("experiment %s submitted as job %s (%s executor)", c.name, job.job_id, opts.executor)
    return jobs

"""Running a list of experiments: one at a time, each recorded (ok or failed) atomically inside its own
folder; a rerun skips what is done; a failure is recorded with its traceback and the sweep goes on."""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from oats.config import config_hash, legacy_config_hash
from oats.records import experiment_dir, read_record, write_record, write_summary

log = logging.getLogger(__name__)

STATUSES = {
    "done": "a result of this very config (same config hash) is on disk",
    "failed": "the last run of this config failed; its record holds the traceback",
    "stale": "a result is on disk, but the config changed since it was written",
    "pending": "no result yet",
}


def is_current(cfg: Any, rec: dict[str, Any]) -> bool:
    """The record was written for this config: its hash, or (a record written before plugins owned
    their keys, which has no hash_version) the hash that code gave this config."""
    if rec.get("config_hash") == config_hash(cfg):
        return True
    return "hash_version" not in rec and rec.get("config_hash") is not None and rec.get("config_hash") == legacy_config_hash(cfg)


def status_of(cfg: Any, out_root: Path) -> str:
    """One of :data:`STATUSES`."""
    rec = read_record(experiment_dir(out_root, cfg.name))
    if rec is None:
        return "pending"
    if not is_current(cfg, rec):
        return "stale"
    return "done" if rec.get("status") == "ok" else "failed"


def run_all(cfgs: Sequence[Any], out_root: Path, force: bool = False) -> dict[str, str]:
    """Run every experiment not already done; a failure is recorded with its traceback and the run goes on."""
    from oats.checkpoint import BlockCheckpointer
    from oats.experiment import run_experiment, versions

    out_root = Path(out_root)
    outcome: dict[str, str] = {}
    for i, cfg in enumerate(cfgs):
        h = config_hash(cfg)
        exp_dir = experiment_dir(out_root, cfg.name)
        if not force and status_of(cfg, out_root) == "done":
            log.info("[%d/%d] %s: done already (config hash %s), skipped", i + 1, len(cfgs), cfg.name, h)
            outcome[cfg.name] = "skipped"
            continue
        log.info("[%d/%d] %s: running (%s)", i + 1, len(cfgs), cfg.name, describe(cfg))
        base = {"name": cfg.name, "config": cfg.to_dict(), "config_hash": h, "hash_version": 2, "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            record = {**base, "status": "ok", **run_experiment(cfg, exp_dir)}
            outcome[cfg.name] = "ok"
        except Exception as e:
            log.error("%s failed: %s: %s", cfg.name, type(e).__name__, e)
            record = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            outcome[cfg.name] = "failed"
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_record(exp_dir, record)
        if outcome[cfg.name] == "ok":  # the result is safe on disk: the block checkpoints have served
            BlockCheckpointer(exp_dir, h).clear()
        write_summary(out_root)
    return outcome


def describe(cfg: Any) -> str:
    """'wanda, sparsity 0.5, unstructured' or 'dense (no compression)' for the log."""
    from oats.config import selected_plugins
    from oats.experiment import method_label

    if not selected_plugins(cfg)["method"].compresses:
        return f"{cfg.method}, no compression"
    return f"{method_label(cfg)}, sparsity {cfg.sparsity:g}, {cfg.sparsity_type}"

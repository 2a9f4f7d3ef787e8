"""Running a list of experiments: one at a time, each recorded (ok or failed) atomically inside its own
folder; a rerun skips what is done; a failure is recorded with its traceback and the sweep goes on."""
from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from oats.config import HASH_VERSION, config_hash, legacy_config_hash
from oats.records import RESULT_FILE, experiment_dir, read_record, write_record, write_summary

log = logging.getLogger(__name__)

STATUSES = {
    "done": "a result of this very config (same config hash) is on disk",
    "failed": "the last run of this config failed; its record holds the traceback",
    "stale": "a result is on disk, but the config (or a corpus it read) changed since it was written",
    "pending": "no result yet",
}


def is_current(cfg: Any, rec: dict[str, Any]) -> bool:
    """The record was written for this config: its hash, or (a record written before plugins owned
    their keys, which has no hash_version) the hash that code gave this config."""
    if rec.get("config_hash") == config_hash(cfg):
        return True
    return "hash_version" not in rec and rec.get("config_hash") is not None and rec.get("config_hash") == legacy_config_hash(cfg)


def data_changed(cfg: Any, rec: dict[str, Any]) -> bool:
    """The record names corpora (size + hash) that now read differently (a data set that cannot be
    read now counts as changed)."""
    if not rec.get("data"):
        return False
    from oats.tasks import data_fingerprints

    try:
        return data_fingerprints(cfg) != rec["data"]
    except Exception:
        return True


def status_of(cfg: Any, out_root: Path) -> str:
    """One of :data:`STATUSES`."""
    rec = read_record(experiment_dir(out_root, cfg.name))
    if rec is None:
        return "pending"
    if not is_current(cfg, rec) or data_changed(cfg, rec):
        return "stale"
    return "done" if rec.get("status") == "ok" else "failed"


def run_all(cfgs: Sequence[Any], out_root: Path, force: bool = False) -> dict[str, str]:
    """Run every experiment not already done; a failure is recorded with its traceback and the run goes on.

    Returns {name: 'ok' | 'failed' | 'skipped' | 'busy'} ('busy': another process holds its lock).
    Each experiment runs under a lock on ``<out>/<name>/.lock``; its record is written atomically into
    its own folder; a record that cannot be written is a failure logged here, never an abort; an
    unreadable old record is kept aside (``result.json.unreadable-*``) before a new one replaces it.
    """
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
        with experiment_lock(exp_dir) as held:
            if not held:
                log.warning("[%d/%d] %s: another process is running it (lock %s held); skipped", i + 1, len(cfgs), cfg.name, exp_dir / LOCK_FILE)
                outcome[cfg.name] = "busy"
                continue
            if not force and status_of(cfg, out_root) == "done":  # finished by another process while we waited
                outcome[cfg.name] = "skipped"
                continue
            log.info("[%d/%d] %s: running (%s)", i + 1, len(cfgs), cfg.name, describe(cfg))
            base = {"name": cfg.name, "config": cfg.to_dict(), "config_hash": h, "hash_version": HASH_VERSION, "versions": versions(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                record = {**base, "status": "ok", **run_experiment(cfg, exp_dir)}
                outcome[cfg.name] = "ok"
            except Exception as e:
                log.error("%s failed: %s: %s", cfg.name, type(e).__name__, e)
                record = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                outcome[cfg.name] = "failed"
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            try:
                keep_aside_unreadable(exp_dir)
                write_record(exp_dir, record)
            except OSError as e:
                log.error("%s: the record could not be written to %s (%s: %s); counted as failed", cfg.name, exp_dir, type(e).__name__, e)
                outcome[cfg.name] = "failed"
                continue
            if outcome[cfg.name] == "ok":  # the result is safe on disk: the block checkpoints have served
                try:
                    BlockCheckpointer(exp_dir, h).clear()
                except Exception as e:  # the result stands; a left-over checkpoint is only disk space
                    log.warning("%s: could not remove its checkpoint folder (%s: %s)", cfg.name, type(e).__name__, e)
        try:
            write_summary(out_root)
        except OSError as e:
            log.error("summary.md could not be written in %s (%s: %s)", out_root, type(e).__name__, e)
    return outcome


LOCK_FILE = ".lock"


@contextlib.contextmanager
def experiment_lock(exp_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``<exp_dir>/.lock`` (fcntl; released when the process dies).
    Yields False when another process holds it."""
    import fcntl

    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def keep_aside_unreadable(exp_dir: Path) -> Path | None:
    """Rename a result.json that exists but is not a readable record, so a new record never silently
    replaces what may be a person's data. Returns the new name, or None when there was nothing to keep."""
    path = exp_dir / RESULT_FILE
    if not path.is_file() or read_record(exp_dir) is not None:
        return None
    aside = path.with_name(f"{RESULT_FILE}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    log.warning("%s was not a readable record; kept as %s", path, aside.name)
    return aside


def describe(cfg: Any) -> str:
    """'wanda, sparsity 0.5, unstructured' or 'dense (no compression)' for the log."""
    from oats.config import selected_plugins
    from oats.experiment import method_label

    if not selected_plugins(cfg)["method"].compresses:
        return f"{cfg.method}, no compression"
    return f"{method_label(cfg)}, sparsity {cfg.sparsity:g}, {cfg.sparsity_type}"

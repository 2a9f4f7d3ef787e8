"""The forward calibrations of :mod:`factored.forward` kept on disk per machine, so ``forward: auto``
measures each (shape, dtype, density, rows) once per machine rather than once per process.

The file is ``$OATS_CACHE_DIR/forward/calibration-<machine>.json`` (default ``~/.cache/oats``), where
``<machine>`` hashes the CPU model and flags, the torch version, the thread count, the compiled
kernel's SIMD path and its source: another machine, build, kernel or thread count measures afresh. Delete the file (or set
``OATS_FORWARD_CACHE=0``, which also stops writing it) to measure again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("OATS_FORWARD_CACHE", "1") != "0"


def machine_key() -> str:
    from factored.kernels import CPP_SOURCE, _cpu_flags, isa

    model = ""
    try:
        model = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    except OSError:
        pass
    source = hashlib.sha1(CPP_SOURCE.encode()).hexdigest()
    text = "|".join([model, _cpu_flags(), torch.__version__, str(torch.get_num_threads()), str(isa()), source])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def path() -> Path:
    from data.files import cache_dir

    return cache_dir("forward") / f"calibration-{machine_key()}.json"


def load() -> dict[tuple, tuple[str, dict[str, float]]]:
    """The stored calibrations ({} when there are none or the file is unreadable)."""
    if not enabled():
        return {}
    p = path()
    try:
        rows = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable forward calibrations %s: %s", p, e)
        return {}
    out = {}
    for key, choice, times in rows:
        key[-1] = tuple(key[-1]) if key[-1] is not None else None  # the candidates
        out[tuple(key)] = (choice, times)
    return out


def save(cache: dict[tuple, tuple[str, dict[str, float]]]) -> None:
    if not enabled():
        return
    from data.files import atomic_write_text

    p = path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps([[list(k), c, t] for k, (c, t) in cache.items()]))
    except OSError as e:  # a read-only cache directory costs a new calibration next time, nothing else
        log.warning("could not store forward calibrations in %s: %s", p, e)

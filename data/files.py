"""Files and caches, in one place: the cache directory (one env var), atomic writes, jsonl reading,
and the one map from dtype names to torch dtypes.

Everything the project writes goes through :func:`atomic_write` (readers see the old file or the new
one, never half of one) or, for a whole folder, :func:`atomic_cache_dir`; every cache lives under
:func:`cache_dir`. What they write follows the user's umask.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

CACHE_ENV = "OATS_CACHE_DIR"
DATA_ENV = "OATS_DATA_DIR"
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def cache_dir(*parts: str) -> Path:
    """``$OATS_CACHE_DIR`` (default ``~/.cache/oats``), joined with ``parts``: converted models, task files, kernels."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "oats").expanduser()
    return root.joinpath(*parts)


def torch_dtype(name: str):
    """'float32' | 'bfloat16' | 'float16' | 'float64' -> the torch dtype."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}; allowed: {DTYPE_NAMES}")
    return getattr(torch, name)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one. The file gets the
    permissions the user's umask gives a new file (mkstemp alone would make it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_cache_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final`` to fill; when the block ends without an error,
    fsync its files, give every folder ``0o777 & ~umask`` and every file ``0o666 & ~umask`` (mkdtemp
    alone makes the folder owner-only), and rename it onto ``final`` (replacing what was there).
    On an error the temporary folder is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-", suffix=".tmp"))
    try:
        yield tmp
        umask = current_umask()
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~umask)
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(path, 0o666 & ~umask)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_jsonl(path: Path, field: str | None = None) -> list[Any]:
    """The rows of a .jsonl or .jsonl.gz file (each row's ``field`` when given)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r[field] for r in rows] if field is not None else rows


def remove_tree(path: Path, inside: Path, marker: str) -> None:
    """Delete the folder ``path``, and only if it lies inside ``inside`` (resolved, no symlink) and
    carries ``marker`` (a file the runner wrote when it made the folder); else refuse, naming why."""
    path, inside = Path(path), Path(inside).resolve()
    if not path.exists():
        return
    if path.is_symlink() or not path.is_dir():
        raise RuntimeError(f"refusing to delete {path}: not a folder the runner made (symlink or file)")
    real = path.resolve()
    if real == inside or inside not in real.parents:
        raise RuntimeError(f"refusing to delete {path}: it is not inside {inside}")
    if not (real / marker).is_file():
        raise RuntimeError(f"refusing to delete {path}: it has no {marker} marker, so the runner did not make it")
    shutil.rmtree(real)

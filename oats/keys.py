"""Config keys as data: one ``Key`` per key (default, types, doc line, check), the checks they share,
and ``ConfigError``. Imports nothing of the project, so every plugin can declare its keys here
without pulling in the framework.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class ConfigError(ValueError):
    """A config key holds a value that is not allowed. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str, experiment: str | None = None):
        self.key, self.detail, self.experiment = key, message, experiment
        where = f"experiment {experiment!r}: " if experiment else ""
        what = key if key.startswith("--") or key in ("CONFIGS", "SLURM") or "." in key or "/" in key else f"config key '{key}'"
        super().__init__(f"{where}{what}: {message}")

    def within(self, experiment: str | None) -> "ConfigError":
        """The same error, naming the experiment it was found in."""
        return self if self.experiment or not experiment else ConfigError(self.key, self.detail, experiment)


Check = Callable[[Any], "str | None"]  # returns an error message, or None if the value is fine


@dataclass(frozen=True)
class Key:
    """One config key: its default, accepted Python types, doc line, an optional extra check, and
    whether None is allowed. ``result`` False keeps a key out of the config hash (it changes how a
    run goes, never what it computes: threads, checkpointing). ``hash_default`` False keeps it out of
    the hash only while it holds its default: a key added to a plugin whose results exist already,
    whose default reproduces them, so their hashes stay. A list value's items must be of
    ``item_types`` (strings unless a key says otherwise)."""

    default: Any
    types: tuple[type, ...]
    doc: str
    check: Check | None = None
    nullable: bool = False
    result: bool = True
    item_types: tuple[type, ...] = (str,)
    hash_default: bool = True

    def validate(self, name: str, value: Any) -> Any:
        """``value`` checked against this key (lists normalised), or ConfigError naming ``name``."""
        expected = "/".join(t.__name__ for t in self.types)
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(name, f"must not be None; expected {expected}")
        if isinstance(value, bool) and bool not in self.types:
            raise ConfigError(name, f"got bool {value!r}; expected {expected}")
        if not isinstance(value, self.types):
            raise ConfigError(name, f"got {type(value).__name__} {value!r}; expected {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"got {value!r}; must be a finite number")
        if isinstance(value, (list, tuple)):
            value = list(value)
            items = self.item_types
            if not all(isinstance(v, items) and (bool in items or not isinstance(v, bool)) for v in value):
                kinds = "strings" if items == (str,) else "numbers" if set(items) <= {int, float} else "/".join(t.__name__ for t in items)
                raise ConfigError(name, f"got {value!r}; expected a list of {kinds}")
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(name, f"got {value!r}; every number must be finite")
        if self.check is not None:
            msg = self.check(value)
            if msg:
                raise ConfigError(name, msg)
        return value


def choice(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        if v in allowed:
            return None
        import difflib

        near = difflib.get_close_matches(str(v), allowed, 1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"got {v!r}{hint}; allowed values: {', '.join(map(repr, allowed))}"

    return check


def interval(lo: float, hi: float, lo_closed: bool = True, hi_closed: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)
        if ok:
            return None
        lb, rb = ("[" if lo_closed else "("), ("]" if hi_closed else ")")
        return f"got {v!r}; must lie in {lb}{lo}, {hi}{rb}"

    return check


def positive(v: Any) -> str | None:
    return None if v > 0 else f"got {v!r}; must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"got {v!r}; must be >= 0"


def parse_nm(sparsity_type: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4) (N kept of every M); 'unstructured' -> None."""
    m = NM_PATTERN.match(sparsity_type)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sparsity_type_check(v: str) -> str | None:
    if v == "unstructured":
        return None
    m = NM_PATTERN.match(v)
    if not m:
        return f"got {v!r}; allowed values: 'unstructured' or 'N:M' such as '2:4' (N kept of every M)"
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        return f"got {v!r}; N:M needs 0 < N < M (N weights kept in every M along the input dimension)"
    return None


class KeyTable(dict):
    """A plugin's (or the framework's) keys, ``{name: Key}``, that can also read a config:
    ``KEYS.value(cfg, "rank_ratio")`` is the config's value, or the key's declared default when the
    config is None (a plugin's math called directly) or holds None / lacks the key."""

    def value(self, cfg: Any, key: str) -> Any:
        spec = self[key]
        value = None if cfg is None else (cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None))
        if value is None:
            return list(spec.default) if isinstance(spec.default, tuple) else spec.default
        return value


def merge_keys(tables: Mapping[str, Mapping[str, Key]]) -> dict[str, Key]:
    """One key table from several (``{owner: {key: Key}}``). A key declared by two owners must be
    declared identically (same default and types), or it is a programming error named here."""
    out: dict[str, Key] = {}
    owner_of: dict[str, str] = {}
    for owner, table in tables.items():
        for k, spec in table.items():
            if k in out and (out[k].default != spec.default or out[k].types != spec.types):
                raise ValueError(f"key {k!r} is declared differently by {owner_of[k]!r} and {owner!r}")
            out.setdefault(k, spec)
            owner_of.setdefault(k, owner)
    return out

"""The tables of plugins: methods, layerwise allocators, weight updates and block updates.

A new plugin is one file that defines its declaration (``METHOD = Method(...)``, ``ALLOCATOR``,
``UPDATE`` or ``BLOCK_UPDATE``; see ``oats.interface``) and one line here naming that module. Modules
are imported on first use, so the framework never imports a plugin package at load time (no import
cycles) and a broken plugin fails only the experiments that select it.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from oats.interface import Allocator, BlockUpdate, Method, Update

METHODS: dict[str, str] = {
    "dense": "baselines.dense",
    "magnitude": "baselines.magnitude",
    "wanda": "baselines.wanda",
    "sparsegpt": "baselines.sparsegpt",
    "oats": "oats.algorithm.method",
    "gram_slr": "baselines.gram_slr",
}
# 'uniform' (every block gets the target) is built in, not a plugin.
ALLOCATORS: dict[str, str] = {"owl": "allocators.owl"}
UPDATES: dict[str, str] = {"optima": "updates.optima"}
BLOCK_UPDATES: dict[str, str] = {"reconstruct": "updates.reconstruct"}

_KINDS = {"method": (METHODS, "METHOD", Method), "allocator": (ALLOCATORS, "ALLOCATOR", Allocator),
          "update": (UPDATES, "UPDATE", Update), "block_update": (BLOCK_UPDATES, "BLOCK_UPDATE", BlockUpdate)}


def register(kind: str, name: str, module: str) -> None:
    """Add a plugin at run time (tests, or a user's own file): ``register('method', 'toy', 'my_pkg.toy')``."""
    table = _KINDS[kind][0]
    table[name] = module
    plugin.cache_clear()


@lru_cache(maxsize=None)
def plugin(kind: str, name: str) -> Any:
    """The declaration of plugin ``name`` of ``kind`` ('method', 'allocator', 'update', 'block_update')."""
    table, attr, cls = _KINDS[kind]
    if name not in table:
        raise KeyError(f"no {kind} {name!r}; registered: {sorted(table)}")
    decl = getattr(importlib.import_module(table[name]), attr, None)
    if not isinstance(decl, cls) or decl.name != name:
        raise TypeError(f"{table[name]}.{attr} must be a {cls.__name__} named {name!r}")
    return decl


def method(name: str) -> Method:
    return plugin("method", name)


def allocator(name: str) -> Allocator:
    return plugin("allocator", name)


def update(name: str) -> Update:
    return plugin("update", name)


def block_update(name: str) -> BlockUpdate:
    return plugin("block_update", name)

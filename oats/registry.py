"""The tables of plugins, one per config key that selects a plugin: ``method``, ``layerwise``,
``weight_update``, ``block_update`` and ``model_update``.

A new plugin is one file that defines its declaration (``METHOD = Method(...)``, ``LAYERWISE =
Layerwise(...)``, ``WEIGHT_UPDATE = WeightUpdate(...)``, ``BLOCK_UPDATE = BlockUpdate(...)`` or
``MODEL_UPDATE = ModelUpdate(...)``; see
``oats.interface``) and one line here naming that module. Modules are imported on first use, so the
framework never imports a plugin package at load time (no import cycles) and a broken plugin fails
only the experiments that select it.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

from oats.interface import BlockUpdate, Layerwise, Method, ModelUpdate, WeightUpdate

METHODS: dict[str, str] = {
    "dense": "baselines.dense",
    "magnitude": "baselines.magnitude",
    "wanda": "baselines.wanda",
    "sparsegpt": "baselines.sparsegpt",
    "oats": "sparse_lowrank.oats",
    "gram_slr": "sparse_lowrank.gram_slr",
}
# 'uniform' (every block gets the target) is built in, not a plugin.
LAYERWISE: dict[str, str] = {"owl": "layerwise.owl"}
WEIGHT_UPDATES: dict[str, str] = {"optima": "weight_updates.optima"}
BLOCK_UPDATES: dict[str, str] = {"reconstruct": "block_updates.reconstruct"}
MODEL_UPDATES: dict[str, str] = {"lowrank_recovery": "model_updates.lowrank_recovery", "masked_distill": "model_updates.masked_distill"}

# kind (= the config key that selects it) -> (table, declaration attribute, declaration class)
KINDS: dict[str, tuple[dict[str, str], str, type]] = {
    "method": (METHODS, "METHOD", Method),
    "layerwise": (LAYERWISE, "LAYERWISE", Layerwise),
    "weight_update": (WEIGHT_UPDATES, "WEIGHT_UPDATE", WeightUpdate),
    "block_update": (BLOCK_UPDATES, "BLOCK_UPDATE", BlockUpdate),
    "model_update": (MODEL_UPDATES, "MODEL_UPDATE", ModelUpdate),
}
BUILTIN = {"layerwise": "uniform", "weight_update": "none", "block_update": "none", "model_update": "none"}  # the value that selects no plugin


def register(kind: str, name: str, module: str) -> None:
    """Add a plugin at run time (tests, or a user's own file): ``register('method', 'toy', 'my_pkg.toy')``."""
    KINDS[kind][0][name] = module
    plugin.cache_clear()


@lru_cache(maxsize=None)
def plugin(kind: str, name: str) -> Any:
    """The declaration of plugin ``name`` of ``kind`` ('method', 'layerwise', 'weight_update', 'block_update', 'model_update')."""
    if kind not in KINDS:
        raise KeyError(f"no plugin kind {kind!r}; kinds: {sorted(KINDS)}")
    table, attr, cls = KINDS[kind]
    if name not in table:
        raise KeyError(f"no {kind} {name!r}; registered: {sorted(table)}")
    decl = getattr(importlib.import_module(table[name]), attr, None)
    if not isinstance(decl, cls) or decl.name != name:
        raise TypeError(f"{table[name]}.{attr} must be a {cls.__name__} named {name!r}")
    return decl


def method(name: str) -> Method:
    return plugin("method", name)


def declared(kind: str) -> dict[str, Any]:
    """Every registered plugin of ``kind`` that imports, by name (a broken plugin is left out)."""
    out = {}
    for name in KINDS[kind][0]:
        try:
            out[name] = plugin(kind, name)
        except Exception:  # a broken plugin fails only the experiments that select it
            continue
    return out

"""Resume inside an experiment: a checkpoint after every compressed block.

Layout, all under the experiment's own ``<out>/<name>/checkpoint/`` (nothing outside it is ever
written or deleted)::

    OATS_CHECKPOINT          marker: this directory is ours (``clear`` refuses to delete one without it)
    meta.json                the commit point: config hash, last finished block, the state file's name
    block_00007.safetensors  compressed block 7's tensors; absent in lazy mode, where the output shard
    block_00007.json         is the block's copy; the JSON names the block's compress-mode layers and shapes
    state_00007.pt           after block 7: the inputs of block 8 (hidden states per calibration batch
                             and the keyword arguments), per-layer records so far, block sparsities,
                             layerwise info, RNG states: tensors and plain values only
    dense_targets.pt         with a ``model_update``: the dense model's targets, recorded before compression
    model_update.pt          with a resumable ``model_update``: its state after its last finished epoch
                             (trained tensors, optimiser, schedule, loss curves; tensors and plain values)

Every file is written to a temporary name and renamed (atomic on POSIX); ``meta.json`` is replaced
last, so a run killed at any instant leaves either the previous complete checkpoint or the new one.
Nothing is unpickled: tensors are safetensors, the state is read with ``torch.load(weights_only=True)``
(tensors, containers, numbers, strings), and ``meta.json`` may only name a state file of this folder
(``state_NNNNN.pt``), so whoever can write the results folder cannot make a resume run code.
Clearing renames the folder to ``.checkpoint-deleting-*`` first, then deletes it: a kill half way
leaves a folder of that name, which only the runner makes and the next run removes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from oats.architectures import get_blocks
from oats.pipeline import BlockInputs
from data.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MARKER = "OATS_CHECKPOINT"
FORMAT = 2
STATE_NAME = re.compile(r"^state_\d{5}\.pt$")
DELETING = ".checkpoint-deleting-"
UPDATE_FILE = "model_update.pt"


@dataclass
class ResumeState:
    """What a restarted run continues from: block ``last_block`` (0-based) and all before it are done."""

    last_block: int
    inputs: BlockInputs  # the inputs of block last_block + 1
    records: list[dict[str, Any]]
    sparsities: list[float]
    layerwise_info: Any
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Every RNG a method may draw from (torch CPU and CUDA, Python, NumPy), as tensors and plain values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _read_state(path: Path, what: str, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """A state file read with ``weights_only``, or None with a warning that ``what`` starts over when it is
    missing, truncated, or holds more than tensors and plain values."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        log.warning("%s cannot be read (%s: %s); %s starts over", path, type(e).__name__, e, what)
        return None


def _save_block(block: nn.Module, directory: Path, i: int) -> None:
    """Block i's tensors as safetensors, and the compress-mode layers it holds as JSON."""
    from safetensors.torch import save_file

    from factored.module import compressed_layers

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
    layers = {n: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank, "nnz": m.nnz,
                  "bias": m.bias is not None} for n, m in compressed_layers(block).items()}
    atomic_write(directory / f"block_{i:05d}.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_text(directory / f"block_{i:05d}.json", json.dumps({"compressed_layers": layers}) + "\n")


class UpdateFile:
    """An ``oats.interface.UpdateStore`` in one file of the checkpoint folder (written atomically, read
    with ``weights_only``)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def save(self, state: dict[str, Any]) -> None:
        _atomic_torch_save(state, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it cannot be read (the update then starts over)."""
        if not self.path.is_file():
            return None
        state = _read_state(self.path, "the model update")
        if state is None:
            return None
        log.info("resuming the model update from %s (after epoch %s)", self.path, state.get("epoch"))
        return state


class BlockCheckpointer:
    """Per-block checkpoints of one experiment.

    exp_dir:     ``<out>/<name>``; the checkpoint lives in ``exp_dir/checkpoint``.
    cfg_hash:    the experiment's config hash; a checkpoint of another hash is stale and ignored.
    save_blocks: keep a copy of each compressed block (False when the caller persists blocks itself,
                 as the lazy path does in its output shards).
    """

    def __init__(self, exp_dir: Path, cfg_hash: str, save_blocks: bool = True):
        self.dir = Path(exp_dir) / CHECKPOINT_DIR
        self.cfg_hash = cfg_hash
        self.save_blocks = save_blocks

    # --- writing ---------------------------------------------------------------------------------
    def save(
        self,
        i: int,
        block: nn.Module,
        next_inputs: BlockInputs,
        records: list[dict[str, Any]],
        sparsities: list[float],
        layerwise_info: Any = None,
    ) -> None:
        """Checkpoint after block ``i`` finished (``block`` compressed, ``next_inputs`` its outputs)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).touch()
        if self.save_blocks:
            _save_block(block, self.dir, i)
        state_name = f"state_{i:05d}.pt"
        _atomic_torch_save(
            {
                "last_block": i,
                "hidden": next_inputs.hidden,
                "kwargs": next_inputs.kwargs,
                "records": list(records),
                "sparsities": [float(s) for s in sparsities],
                "layerwise_info": layerwise_info,
                "rng": rng_state(),
            },
            self.dir / state_name,
        )
        previous = self._meta()
        meta = {"format": FORMAT, "config_hash": self.cfg_hash, "last_block": i, "state": state_name, "save_blocks": self.save_blocks}
        atomic_write_text(self.dir / "meta.json", json.dumps(meta, indent=1) + "\n")
        if previous and previous.get("state") and previous["state"] != state_name:
            (self.dir / previous["state"]).unlink(missing_ok=True)
        log.debug("checkpoint after block %d in %s", i, self.dir)

    def after_block_fn(
        self, records: list[dict[str, Any]], sparsities: list[float], layerwise_info: Any = None
    ) -> Callable[[int, nn.Module, BlockInputs], None]:
        """An ``after_block`` callback for ``compress_model`` that checkpoints every finished block."""

        def after_block(i: int, block: nn.Module, next_inputs: BlockInputs) -> None:
            self.save(i, block, next_inputs, records, sparsities, layerwise_info)

        return after_block

    def update_store(self) -> UpdateFile:
        """Where the model update keeps its state between epochs (valid once a block is checkpointed:
        the folder, its marker and the config hash are those of the block checkpoint)."""
        return UpdateFile(self.dir / UPDATE_FILE)

    # --- reading ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), str) or not STATE_NAME.match(meta["state"]):
            log.warning("%s/meta.json is not a checkpoint of this runner (state file %r); ignored", self.dir,
                        meta.get("state") if isinstance(meta, dict) else meta)
            return None
        return meta

    def last_block(self) -> int | None:
        """The last finished block of a checkpoint matching this config, else None (cheap: reads meta.json)."""
        meta = self._meta()
        if not meta or meta.get("config_hash") != self.cfg_hash or meta.get("format") != FORMAT:
            return None
        return int(meta["last_block"])

    def load(self, device: torch.device | str = "cpu") -> ResumeState | None:
        """The state to resume from, or None (no checkpoint; or a stale one, which is then removed)."""
        meta = self._meta()
        if meta is None:
            return None
        if meta.get("config_hash") != self.cfg_hash or meta.get("format") != FORMAT or meta.get("save_blocks") != self.save_blocks:
            log.warning("checkpoint in %s belongs to another config (hash %s, now %s); starting over",
                        self.dir, meta.get("config_hash"), self.cfg_hash)
            self.clear()
            return None
        state = _read_state(self.dir / meta["state"], "the run", device)
        if state is None:
            self.clear()
            return None
        if state["last_block"] != meta["last_block"]:
            raise RuntimeError(f"{self.dir}: meta.json says block {meta['last_block']}, {meta['state']} says {state['last_block']}")
        log.info("resuming from the checkpoint after block %d in %s", state["last_block"], self.dir)
        return ResumeState(
            last_block=state["last_block"],
            inputs=BlockInputs(state["hidden"], state["kwargs"]),
            records=state["records"],
            sparsities=state["sparsities"],
            layerwise_info=state["layerwise_info"],
            rng=state["rng"],
        )

    def restore_blocks(self, model: nn.Module, last_block: int) -> None:
        """Put the checkpointed compressed blocks 0..last_block back into ``model`` (on the CPU)."""
        if not self.save_blocks:
            raise RuntimeError("this checkpoint keeps no block copies (lazy mode reads them from the output shards)")
        from safetensors.torch import load_file

        from factored.module import SparseLowRankLinear
        from factored.module import set_module

        blocks = get_blocks(model)
        for j in range(last_block + 1):
            tensors = load_file(str(self.dir / f"block_{j:05d}.safetensors"))
            layers = json.loads((self.dir / f"block_{j:05d}.json").read_text())["compressed_layers"]
            block = blocks[j]
            dtype = next(block.parameters()).dtype
            for name, spec in layers.items():  # compress mode replaced these linears
                set_module(block, name, SparseLowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["nnz"],
                                                            spec["bias"], dtype=dtype))
            block.load_state_dict(tensors, strict=True)

    def clear(self) -> None:
        """Delete this experiment's checkpoint directory, and only it (it must carry our marker): renamed
        first (atomic), then deleted, so a kill half way leaves a folder only the runner names so."""
        d = self.dir
        self.remove_leftovers()
        if not d.exists() and not d.is_symlink():
            return
        if d.is_symlink() or d.name != CHECKPOINT_DIR or not (d / MARKER).is_file():
            raise RuntimeError(f"refusing to delete {d}: not an oats checkpoint directory")
        doomed = d.parent / f"{DELETING}{os.getpid()}"
        os.replace(d, doomed)
        shutil.rmtree(doomed)

    def remove_leftovers(self) -> None:
        """Remove what a clear killed half way left: ``.checkpoint-deleting-*`` folders (real folders only)."""
        for p in self.dir.parent.glob(f"{DELETING}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def describe(exp_dir: Path) -> str | None:
    """'block k done' for ``--list`` when an experiment has a checkpoint (any config), else None."""
    try:
        meta = json.loads((Path(exp_dir) / CHECKPOINT_DIR / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return f"checkpoint after block {meta.get('last_block')}"

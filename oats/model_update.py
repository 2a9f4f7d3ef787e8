"""The model-update step of the lifecycle (config key ``model_update``): the dense model's targets recorded
before compression, the selected ``ModelUpdate`` run on the whole compressed model after the last
block, and the framework's checks around it (masks bit for bit, and sparse values too unless the update
trains them; ranks; kept parameters counted again). It names no plugin.

While the update runs every compressed linear is a ``factored.module.SparseLowRankLinear`` (the
compressor builds them when a model update is selected, as compress mode does, and for an update that
trains the sparse values also holds a pure-sparse method's pruned linears as rank-0 ones); without ``compress``
they are merged back into dense weights afterwards (:func:`merge_factored`), so the evaluated model is
the one plain compression would have given, only with the updated factors.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oats.architectures import architecture_of
from oats.interface import DenseTargets, ModelUpdate, UpdateStore

log = logging.getLogger(__name__)

TARGETS_FILE = "dense_targets.pt"  # in the checkpoint folder: a resumed run needs the dense model's targets


@torch.no_grad()
def dense_targets(model: nn.Module, ids: Tensor, topk: int, device: torch.device, batch_size: int = 1) -> DenseTargets:
    """The dense ``model``'s ``topk`` largest next-token log-probabilities (at most the vocabulary) at every
    position of the windows ``ids`` [n, L] (in float32 on ``device``; the model is moved there and back)."""
    arch = architecture_of(model)
    home = next(model.parameters()).device
    model.to(device)
    logprobs, index = [], []
    try:
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="dense targets", leave=False):
            batch = ids[start : start + batch_size].to(device)
            logits = model(**arch.inputs(batch)).logits.float()
            top = torch.log_softmax(logits, dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
            logprobs.append(top.values.cpu())
            index.append(top.indices.cpu())
    finally:
        model.to(home)
    return DenseTargets(ids.cpu().long(), torch.cat(logprobs), torch.cat(index))


def save_targets(targets: DenseTargets, directory: Path) -> None:
    from oats.checkpoint import MARKER, _atomic_torch_save

    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).touch()  # the folder is the runner's checkpoint folder from now on (only such are ever deleted)
    _atomic_torch_save({"ids": targets.ids, "logprobs": targets.logprobs, "index": targets.index}, directory / TARGETS_FILE)


def load_targets(directory: Path) -> DenseTargets | None:
    path = directory / TARGETS_FILE
    if not path.is_file():
        return None
    d = torch.load(path, map_location="cpu", weights_only=True)
    return DenseTargets(d["ids"], d["logprobs"], d["index"])


def _digest(t: Tensor) -> str:
    return hashlib.blake2b(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _fingerprint(layers: dict[str, nn.Module], values: bool = True) -> dict[str, tuple[str, str, int]]:
    """Per layer: digests of its sparse values (or '' without ``values``) and mask, and its rank."""
    return {n: (_digest(m.values) if values else "", _digest(m.mask), int(m.rank)) for n, m in layers.items()}


def run_model_update(model: nn.Module, update: ModelUpdate, targets: DenseTargets, cfg: Any, device: torch.device,
                     store: UpdateStore | None = None) -> dict[str, Any]:
    """Apply ``update`` to the in-memory compressed ``model`` (on ``device`` for the call) and check it kept
    every layer's sparse part and rank; a resumable update keeps its state between epochs in ``store``
    (when given). Returns the record's ``model_update`` entry."""
    from factored.module import compressed_layers

    layers = compressed_layers(model)
    if not layers:
        raise RuntimeError(f"model_update {update.name!r}: the compressed model holds no factored layer to update")
    keep_values = not update.trains_sparse
    before = _fingerprint(layers, keep_values)
    kept_before = sum(m.param_count() for m in layers.values())
    home = next(model.parameters()).device
    arch = architecture_of(model)

    def logits_of(ids: Tensor) -> Tensor:
        return model(**arch.inputs(ids.to(device))).logits

    t0 = time.perf_counter()
    model.to(device)
    try:
        extra = {"store": store} if update.resumable else {}
        info = update.apply(model, layers, targets, logits_of, cfg, device, **extra)
    finally:
        model.to(home)
    seconds = time.perf_counter() - t0
    after_layers = compressed_layers(model)
    if set(after_layers) != set(layers):
        raise RuntimeError(f"model_update {update.name!r} replaced factored layers: {sorted(set(layers) ^ set(after_layers))[:5]}")
    after = _fingerprint(after_layers, keep_values)
    changed = [n for n in layers if before[n] != after[n]]
    if changed:
        what = "sparse values, mask or rank" if keep_values else "mask or rank"
        raise RuntimeError(f"model_update {update.name!r} changed the {what} of {changed[:5]}")
    kept_after = sum(m.param_count() for m in after_layers.values())
    if kept_after != kept_before:
        raise RuntimeError(f"model_update {update.name!r} changed the kept parameters: {kept_before} -> {kept_after}")
    log.info("model_update %s: %d factored layers, %.0f s", update.name, len(layers), seconds)
    checked = {"sparse_parts_unchanged": True} if keep_values else {"masks_unchanged": True}
    return {"name": update.name, **info, "layers": len(layers), **checked,
            "kept_params_before": kept_before, "kept_params_after": kept_after, "seconds": seconds}


def merge_factored(model: nn.Module) -> int:
    """Every SparseLowRankLinear of ``model`` replaced by an ``nn.Linear`` holding ``S + U V`` (summed in
    float32, cast to the layer's dtype), as plain compression writes it back. Returns how many."""
    from factored.module import compressed_layers, set_module

    layers = compressed_layers(model)
    for name, m in layers.items():
        dtype = m.values.dtype
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=m.values.device)
        with torch.no_grad():
            linear.weight.copy_(m.merged_weight())
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        set_module(model, name, linear)
    return len(layers)

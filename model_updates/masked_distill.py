"""Masked distillation: after compression, train every kept weight of the compressed model end to end,
every mask fixed, so that its next-token distributions match the dense model's on the calibration text.

The trained tensors are each compressed linear's packed sparse values (the entries its mask keeps, so
the mask and the count of kept weights cannot change), its low-rank factors U and V when it has them,
and, with ``recovery_norms``, the norms' weights. Pruned entries stay exactly zero: the mask is not a
parameter. This is ``lowrank_recovery`` with the sparse part trained too, and it applies to every
method: a pure-sparse method's pruned linears are held as rank-0 factored layers while it runs (the
framework builds them), so SparseGPT or Wanda gets the same end-to-end step as OATS, and a sparse
method with and without it can be compared with OATS + recovery at equal kept parameters.

The loss, the optimiser, the schedule, the held-out early stopping and the keys are those of
``model_updates.lowrank_recovery`` (its :func:`~model_updates.lowrank_recovery.distill`); see there.
Departure from sparse fine-tuning as usually published (e.g. SparseGPT's or Wanda's LoRA/full
fine-tuning after pruning, on hundreds of millions of tokens with the task loss): the loss here is the
KL to the dense model on the calibration windows only, so it needs no data beyond calibration.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model_updates.lowrank_recovery import KEYS, distill
from model_updates.lowrank_recovery import MODEL_UPDATE as LOWRANK_RECOVERY
from oats.interface import DenseTargets, LogitsFn, ModelUpdate, UpdateStore


def train_kept(model: nn.Module, layers: dict[str, nn.Module], targets: DenseTargets, logits_of: LogitsFn, cfg: Any,
               device: torch.device, store: UpdateStore | None = None) -> dict[str, Any]:
    """Train ``layers``' packed values, U and V (and the norms with ``recovery_norms``) of ``model`` against
    ``targets``; in place. Returns the record's facts (:func:`model_updates.lowrank_recovery.distill`)."""
    owners = [(m, a) for m in layers.values() for a in ("values", "U", "V") if getattr(m, a).numel() > 0]
    return distill(model, owners, targets, logits_of, cfg, device, store)


MODEL_UPDATE = ModelUpdate(
    "masked_distill", train_kept, topk=LOWRANK_RECOVERY.topk, keys=KEYS,
    needs_lowrank=False, trains_sparse=True, resumable=True, workspace=LOWRANK_RECOVERY.workspace, validate=LOWRANK_RECOVERY.validate,  # the same targets and Adam state per trained weight
    doc="train every kept weight (sparse values on their fixed masks, low-rank factors, optionally norms) end to end by KL "
        "distillation against the dense model's next-token distributions on the calibration text; masks and budget kept",
    paper="masked knowledge distillation after pruning (fine-tuning with fixed masks, e.g. Kurtic et al., 2023)",
)

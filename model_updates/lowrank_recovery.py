"""Low-rank recovery: after an OATS (or gram_slr) model is compressed, train only its low-rank factors
(and, when asked, its norms) end to end so that the compressed model's next-token distributions match
the dense model's on the calibration text.

Each compressed linear computes ``x Sᵀ + (x Vᵀ) Uᵀ``; the sparse part S (values and mask) is frozen, so
the mask and the parameter budget are those of the compression; U and V are exactly the pair the PEFT
adapter of the export writes, so this is low-rank-adapter distillation with the adapter initialised
by the decomposition. The loss is the Kullback-Leibler divergence from the dense model's distribution,

    KL(p_dense || p_compressed)  over the k+1 outcomes {the dense model's top-k tokens, every other token},

averaged over positions: the framework records the dense model's k largest log-probabilities per
position before compression (``recovery_topk``), and the rest of the vocabulary is one outcome whose
probability is one minus theirs. This is a proper KL divergence of the two distributions coarsened to
those k+1 outcomes (zero exactly when they agree on them); with k the vocabulary size it is the full KL.
Storing k values per position instead of the vocabulary is what keeps the targets small
(k·12 bytes a token).

How:

* Trainable tensors are float32 master copies, whatever the model's dtype; before each forward the
  layer (or norm) gets the master cast to its dtype, so gradients reach the masters. At the end the
  masters are written back, cast, as the layer's ``U``, ``V`` (and the norms' ``weight``).
* Adam at ``recovery_lr``, ``recovery_batch_size`` windows a step (gradients accumulated window by
  window, so one window's logits are in memory at a time), cosine schedule to 0 over
  ``recovery_epochs`` passes over the training windows (shuffled each epoch, seeded).
* ``recovery_holdout``: a seeded share of the windows is held out of training; their loss is measured
  before training and after every epoch, training stops once ``recovery_patience`` + 1 epochs in a row
  have not lowered the best of it (at the first such epoch by default), and the masters of the best
  epoch are restored (``block_updates.holdout``, the rule block reconstruction uses too), so the
  held-out loss never ends above where it started. A patience lets the cosine schedule's later,
  smaller steps take back a rise of the held-out loss in the middle of a run (small batches, one
  window a step, show such rises). Without a holdout, the loss over all windows is measured before
  and after and the given factors are kept when training raised it.
* Resumable: with a store (the run's ``checkpoint_blocks`` folder) the masters, Adam's moments, the
  schedule, the shuffling generator, the early-stopping state and the curves are saved after every
  epoch, and a killed run goes on after the last saved epoch to the same factors bit for bit.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from block_updates.holdout import EarlyStop, check_patience, holdout_windows
from oats.interface import DenseTargets, LogitsFn, ModelUpdate, UpdateStore
from oats.keys import Key, KeyTable, interval, non_negative, positive

log = logging.getLogger(__name__)

SEED = 0

KEYS = KeyTable({
    "recovery_epochs": Key(3, (int,), "distillation (lowrank_recovery, masked_distill): passes over the calibration windows", positive),
    "recovery_lr": Key(1e-4, (float,), "distillation (lowrank_recovery, masked_distill): Adam learning rate (cosine to 0 over all steps)", positive),
    "recovery_batch_size": Key(4, (int,), "distillation (lowrank_recovery, masked_distill): calibration windows per Adam step", positive),
    "recovery_topk": Key(64, (int,), "distillation (lowrank_recovery, masked_distill): the dense model's k most likely next tokens kept per position (the rest is one outcome of the KL)", positive),
    "recovery_norms": Key(False, (bool,), "distillation (lowrank_recovery, masked_distill): also train every RMSNorm/LayerNorm weight of the model"),
    "recovery_holdout": Key(0.125, (float, int), "distillation (lowrank_recovery, masked_distill): share of the calibration windows held out (seeded) for early stopping, best epoch restored; 0 = off (then the factors are kept only if the loss over all windows fell)", interval(0.0, 1.0)),
    "recovery_patience": Key(0, (int,), "distillation (lowrank_recovery, masked_distill): epochs in a row without a new best held-out loss that training goes on through before it stops (0 = stop at the first); the best epoch is restored either way", non_negative, hash_default=False),
})


def coarse_kl(logits: Tensor, logprobs: Tensor, index: Tensor) -> Tensor:
    """Mean over positions of KL(p || q) over the k+1 outcomes {index's tokens, the rest}.

    logits [L, V] of q (any float dtype, computed in float32); logprobs [L, k] and index [L, k] of p.
    """
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, index)
    p = logprobs.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (logprobs - q_top)).sum(-1) + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return kl.mean()


class _Masters:
    """Float32 trainable copies of some of a model's parameters, cast into their modules before every
    forward (forward pre-hooks) so the autograd graph reaches them; :meth:`restore` puts them back as
    parameters of the original dtype."""

    def __init__(self, owners: list[tuple[nn.Module, str]]):
        self.entries: list[tuple[nn.Module, str, torch.dtype, Tensor, bool]] = []
        self.hooks = []
        for module, attr in owners:
            param = module._parameters.pop(attr)
            master = param.detach().to(torch.float32).clone().requires_grad_(True)
            self.entries.append((module, attr, param.dtype, master, param.requires_grad))
            setattr(module, attr, master.detach().to(param.dtype))
            self.hooks.append(module.register_forward_pre_hook(self._hook(attr, param.dtype, master)))

    @staticmethod
    def _hook(attr: str, dtype: torch.dtype, master: Tensor):
        def hook(module: nn.Module, args: Any) -> None:
            setattr(module, attr, master.to(dtype))
        return hook

    def tensors(self) -> list[Tensor]:
        return [e[3] for e in self.entries]

    def snapshot(self) -> list[Tensor]:
        return [m.detach().clone() for m in self.tensors()]

    @torch.no_grad()
    def load(self, values: list[Tensor]) -> None:
        for m, v in zip(self.tensors(), values):
            m.copy_(v)

    def restore(self) -> None:
        for h in self.hooks:
            h.remove()
        for module, attr, dtype, master, grad in self.entries:
            delattr(module, attr)
            module.register_parameter(attr, nn.Parameter(master.detach().to(dtype).clone(), requires_grad=grad))


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), nn.Parameter)]


def recover(model: nn.Module, layers: dict[str, nn.Module], targets: DenseTargets, logits_of: LogitsFn, cfg: Any,
            device: torch.device, store: UpdateStore | None = None) -> dict[str, Any]:
    """Train ``layers``' U and V (and the norms with ``recovery_norms``) of ``model`` (on ``device``; its
    logits ``logits_of(ids)``) against ``targets``; in place. Returns the record's facts (:func:`distill`)."""
    owners = [(m, a) for m in layers.values() for a in ("U", "V") if getattr(m, a).numel() > 0]
    return distill(model, owners, targets, logits_of, cfg, device, store)


def distill(model: nn.Module, owners: list[tuple[nn.Module, str]], targets: DenseTargets, logits_of: LogitsFn, cfg: Any,
            device: torch.device, store: UpdateStore | None = None) -> dict[str, Any]:
    """Train the parameters ``owners`` [(module, attribute name)] of ``model`` (and every norm's weight with
    ``recovery_norms``), every other parameter frozen, by the KL distillation of the module docstring; in
    place; after every epoch the state goes to ``store`` (when given), and a state found there is gone on
    from. Returns the record's facts: the loss before and after, the per-step training loss and per-epoch
    held-out loss (the loss curve), steps, the trained parameter count, and the epoch resumed after."""
    t0 = time.perf_counter()
    epochs, lr, bs = int(KEYS.value(cfg, "recovery_epochs")), float(KEYS.value(cfg, "recovery_lr")), int(KEYS.value(cfg, "recovery_batch_size"))
    share, train_norms = float(KEYS.value(cfg, "recovery_holdout")), bool(KEYS.value(cfg, "recovery_norms"))
    patience = int(KEYS.value(cfg, "recovery_patience"))
    n = int(targets.ids.shape[0])
    held = holdout_windows(n, share, SEED)
    train = [i for i in range(n) if i not in set(held)]
    owners = list(owners)
    if train_norms:
        owners += [(m, "weight") for m in _norms(model)]
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    masters = _Masters(owners)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    def loss_of(i: int) -> Tensor:
        ids = targets.ids[i : i + 1].to(device)
        logits = logits_of(ids)[0]
        return coarse_kl(logits, targets.logprobs[i].to(device), targets.index[i].to(device))

    @torch.no_grad()
    def mean_loss(rows: list[int]) -> float:
        return float(sum(float(loss_of(i)) for i in rows) / max(len(rows), 1))

    try:
        check_rows = held or list(range(n))
        steps_per_epoch = math.ceil(len(train) / bs)
        total = max(1, epochs * steps_per_epoch)
        opt = torch.optim.Adam(masters.tensors(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        gen = torch.Generator().manual_seed(SEED)
        saved = store.load() if store is not None else None
        if saved is None:
            start_loss = mean_loss(check_rows)
            stop = EarlyStop(start_loss, masters.snapshot(), patience)
            train_curve, held_curve, step, first_epoch, seconds_before = [], [], 0, 0, 0.0
        else:
            _check_saved(saved, masters.tensors(), epochs)
            masters.load(saved["masters"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["schedule"])
            gen.set_state(saved["generator"])
            stop = EarlyStop.from_state(saved["early_stop"])
            start_loss, train_curve, held_curve = saved["loss_before"], list(saved["train_curve"]), list(saved["held_curve"])
            step, first_epoch, seconds_before = saved["step"], saved["epoch"], saved["seconds"]
        bar = tqdm(total=total, initial=step, desc="distillation", leave=False)
        for epoch in range(first_epoch, first_epoch if stop.stopped_at else epochs):
            order = [train[j] for j in torch.randperm(len(train), generator=gen).tolist()]
            for b in range(0, len(order), bs):
                rows = order[b : b + bs]
                opt.zero_grad(set_to_none=True)
                total_loss = 0.0
                for i in rows:
                    loss = loss_of(i) / len(rows)
                    loss.backward()
                    total_loss += float(loss.detach())
                opt.step()
                sched.step()
                step += 1
                train_curve.append(round(total_loss, 6))
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}")
            stopping = False
            if held:
                h = mean_loss(held)
                held_curve.append(round(h, 6))
                log.info("distillation: epoch %d, held-out KL %.5f (best %.5f)", epoch + 1, h, stop.best_loss)
                stopping = stop.should_stop(epoch + 1, h, masters.snapshot)
            if store is not None:
                store.save({"epoch": epoch + 1, "masters": [t.detach() for t in masters.tensors()], "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                            "generator": gen.get_state(), "early_stop": stop.state(), "loss_before": start_loss,
                            "train_curve": train_curve, "held_curve": held_curve, "step": step,
                            "seconds": seconds_before + time.perf_counter() - t0})
            if stopping:
                break
        bar.close()
        if held:
            masters.load(stop.best_state)
            end_loss, reverted = stop.best_loss, stop.best_epoch == 0
        else:
            end_loss = mean_loss(check_rows)
            reverted = end_loss > start_loss
            if reverted:
                masters.load(stop.best_state)
                end_loss = start_loss
        trained = sum(t.numel() for t in masters.tensors())
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        masters.restore()
        model.train(was_training)
    return {
        "loss": "KL(dense || compressed) over the dense top-k tokens and the rest, mean over positions",
        "topk": targets.topk, "windows_train": len(train), "windows_holdout": len(held),
        "loss_before": start_loss, "loss_after": end_loss, "loss_measured_on": "holdout" if held else "all windows",
        "epochs": epochs, "epochs_run": stop.stopped_at or epochs, "best_epoch": stop.best_epoch if held else None,
        "patience": patience if held else None, "steps": step,
        "lr": lr, "batch_size": bs, "schedule": "cosine", "norms_trained": train_norms, "trained_params": trained,
        "reverted": reverted, "train_loss_per_step": train_curve, "holdout_loss_per_epoch": held_curve,
        "train_seconds": seconds_before + time.perf_counter() - t0,
        **({"resumed_after_epoch": first_epoch} if saved is not None else {}),
    }


def _check_saved(saved: dict[str, Any], masters: list[Tensor], epochs: int) -> None:
    """A saved state must be of this training: the same trained tensors (shapes) and no more epochs than asked."""
    shapes = [tuple(t.shape) for t in saved["masters"]]
    if shapes != [tuple(t.shape) for t in masters] or saved["epoch"] > epochs:
        raise RuntimeError(f"the saved distillation state ({len(shapes)} tensors, after epoch {saved['epoch']}) is not of this run "
                           f"({len(masters)} tensors, {epochs} epochs); remove the experiment's checkpoint folder to start over")


def validate(cfg: Any) -> None:
    check_patience("recovery_patience", int(KEYS.value(cfg, "recovery_patience")), "recovery_holdout",
                   float(KEYS.value(cfg, "recovery_holdout")))


def _workspace(model_params: int, trained_params: int, cfg: Any) -> int:
    """Masters, gradients and Adam's two moments of the trained tensors (float32)."""
    return 4 * 4 * trained_params


MODEL_UPDATE = ModelUpdate(
    "lowrank_recovery", recover, topk=lambda cfg: int(KEYS.value(cfg, "recovery_topk")), keys=KEYS,
    needs_lowrank=True, workspace=_workspace, validate=validate, resumable=True,
    doc="train only the low-rank factors (and optionally norms) end to end by KL distillation against the dense model's "
        "next-token distributions on the calibration text; masks and budget kept",
    paper="low-rank adapter distillation after sparse + low-rank compression (e.g. 3BASiL, Makni et al., NeurIPS 2025)",
)

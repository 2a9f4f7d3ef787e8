"""Block reconstruction: fine-tune a compressed transformer block's kept weights to match its dense outputs.

Layer-wise methods (Wanda, SparseGPT, OATS, gram_slr) each fit one linear layer to its own inputs;
the errors of a block's seven layers then compound through attention, the MLP and the residual
stream. 3BASiL (NeurIPS 2025, "transformer-level matching") follows the layer-wise step with a
block-level one: with the masks fixed, optimise the block's surviving weights (and low-rank factors)
by Adam so that the compressed block reproduces the dense block's outputs on the calibration inputs,

    minimise  sum over windows  || block_c(h) - block_dense(h) ||^2 / numel

where ``h`` are the block's calibration inputs and the targets are computed by the caller: with
``recon_target 'dense_block'`` (default) ``block_dense(h)``, the dense block on the *same* inputs, i.e.
on the outputs of the already compressed earlier blocks; with ``'dense_model'`` the dense model's own
activations at this block's output, ``block_dense(h_dense)`` (the framework streams the dense model
beside the compressed one), so the block also learns to undo the error its inputs carry.

How (pure PyTorch, no model-specific code):

* The block's compressed linears are swapped, for the duration of the call, for small modules that
  compute ``x @ (S * mask + U V)^T + b`` in float32 from float32 *master* copies of ``S`` (or the
  dense pruned weight), ``U`` and ``V``, whatever the block's dtype (a bfloat16 block keeps running in
  bfloat16 elsewhere; the linear's output is cast back to the input's dtype). Biases are frozen
  (they are not part of a method's answer).
* The mask is held exactly: gradients of ``S`` are multiplied by the mask before every Adam step and
  ``S`` is re-masked after it, so pruned entries stay exactly 0 and the mask returned is the one given.
* ``recon_norms``: the block's RMSNorm/LayerNorm weights (modules whose class name ends in 'Norm' and
  that own a ``weight``) are trained too, through float32 master copies; as they are not part of the
  compressed answer they are written back *into the block* (in their own dtype) and named in
  ``info['norms_trained']``. Everything else in the block is frozen.
* Adam on all trainable tensors, ``recon_lr``, ``recon_epochs`` passes over the calibration windows,
  ``recon_batch_size`` windows per step (at most the largest calibration batch; windows shuffled
  each epoch, seeded), so the number of steps grows with the windows given; schedule ``cosine`` (to 0
  over all steps), ``linear`` (to 0) or ``constant``.
* ``recon_window`` (Shin et al., EMNLP 2024, cross-block reconstruction): the framework hands over
  that many consecutive blocks chained as one module (``oats.interface.BlockChain``), their inputs and
  the targets at the last one's output; they are fitted together like one block.
* ``recon_dense_inputs`` a (Shin et al.'s global propagation at a = 1): the training inputs are
  ``(1 - a) h + a h_dense``, ``h_dense`` the dense model's own inputs of the block; with
  ``recon_target 'dense_block'`` the targets are the dense block's outputs on those same inputs (from
  a frozen copy of the dense block), with ``'dense_model'`` the dense model's activations.
  ``recon_dense_inputs_decay``: epoch e of E uses ``a (1 - e / E)``, ending near the compressed inputs.
* ``recon_parts 'attn_mlp'``: first the linears under the block's attention module (its child whose
  class name contains 'Attention') are trained, to match the residual stream after attention
  (``z + attention_dense(z)``, z the target's inputs; the forward stops there), for ``recon_epochs``;
  then the other linears, to match the block's outputs, for ``recon_epochs``. Norms (``recon_norms``)
  train in both stages.
* ``recon_holdout`` s: a seeded share s of the windows (at least one, at most all but one; the same
  ones on every call) is held out of training; after each epoch the block-output loss on them is
  measured, and once ``recon_patience`` + 1 epochs in a row have not lowered the best of it (at the
  first such epoch by default) training stops; the weights of the best epoch (possibly the given ones)
  are restored (``block_updates.holdout``, the rule every training loop shares).
* The loss over all windows (the block's own inputs, the given targets) is measured before and after;
  if training made it worse (a too-large learning rate), the given weights are returned unchanged
  (``info['reverted'] = True``).

On return the block holds its original modules again (the caller writes the returned weights back).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from block_updates.holdout import EarlyStop, check_patience, holdout_windows
from factored.module import set_module
from oats.interface import BLOCK_TARGETS, BlockChain, BlockUpdate, CompressedWeight
from oats.keys import ConfigError, Key, KeyTable, choice, interval, non_negative, positive

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant", "linear")
TARGETS = BLOCK_TARGETS
PARTS = ("block", "attn_mlp")

# Its config keys (validated and hashed only when block_update is 'reconstruct').
KEYS = KeyTable({
    "recon_lr": Key(1e-4, (float,), "block reconstruction: Adam learning rate", positive),
    "recon_epochs": Key(10, (int,), "block reconstruction: passes over the calibration windows", positive),
    "recon_batch_size": Key(4, (int,), "block reconstruction: calibration windows per Adam step", positive),
    "recon_schedule": Key("cosine", (str,), "block reconstruction: learning-rate schedule over all steps, `cosine` (to 0), `linear` (to 0) or `constant`", choice(*SCHEDULES)),
    "recon_norms": Key(False, (bool,), "block reconstruction: also train the block's RMSNorm/LayerNorm weights (written back in place)"),
    "recon_target": Key("dense_block", (str,), "block reconstruction target: `dense_block` (the dense block's outputs on the same, compressed-model inputs) or `dense_model` (the dense model's own activations at the block's output)", choice(*TARGETS)),
    # added after results with the keys above existed: hashed only when set away from their defaults
    "recon_window": Key(1, (int,), "block reconstruction: consecutive blocks fitted together (cross-block reconstruction; windows [0, w), [w, 2w), ...); at most the model's number of blocks", positive, hash_default=False),
    "recon_dense_inputs": Key(0.0, (float, int), "block reconstruction: share a in [0, 1] of the dense model's own inputs in the training inputs, (1 - a)·compressed + a·dense (1 = global propagation)", interval(0.0, 1.0, hi_closed=True), hash_default=False),
    "recon_dense_inputs_decay": Key(False, (bool,), "block reconstruction: decay `recon_dense_inputs` linearly over the epochs (epoch e of E uses a·(1 - e/E))", hash_default=False),
    "recon_parts": Key("block", (str,), "block reconstruction: `block` (all linears at once) or `attn_mlp` (the attention linears to the residual after attention, then the others to the block's outputs)", choice(*PARTS), hash_default=False),
    "recon_holdout": Key(0.0, (float, int), "block reconstruction: share of the calibration windows held out (seeded) for early stopping at the first epoch that does not lower their loss, best epoch restored; 0 = off", interval(0.0, 1.0), hash_default=False),
    "recon_patience": Key(0, (int,), "block reconstruction: epochs in a row without a new best held-out loss (`recon_holdout`) that training goes on through before it stops (0 = stop at the first); the best epoch is restored either way", non_negative, hash_default=False),
})
SEED = 0


class MaskedLinear(nn.Module):
    """``y = x @ (S * mask + U V)^T + b`` with float32 master ``S`` [out, in], ``U`` [out, r], ``V`` [r, in].

    ``mask`` (float 0/1 buffer) is applied in the forward too, so a pruned entry can never contribute.
    The bias (frozen) is kept in float32. Inputs of any float dtype; the output has the input's dtype.
    """

    def __init__(self, sparse: Tensor, mask: Tensor, U: Tensor | None, V: Tensor | None, bias: Tensor | None):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))
        self.weight = nn.Parameter(sparse.detach().to(torch.float32).clone() * self.mask)
        if U is not None and V is not None and U.shape[1] > 0:
            self.U = nn.Parameter(U.detach().to(torch.float32).clone())
            self.V = nn.Parameter(V.detach().to(torch.float32).clone())
        else:
            self.U = self.V = None
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def effective_weight(self) -> Tensor:
        W = self.weight * self.mask
        if self.U is not None:
            W = W + self.U @ self.V
        return W

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(torch.float32), self.effective_weight(), self.bias).to(x.dtype)

    @torch.no_grad()
    def remask_(self) -> None:
        self.weight.mul_(self.mask)


def _slice_batch(obj: Any, b: int, full: int) -> Any:
    """Keyword arguments for the first ``b`` of ``full`` windows: tensors with a leading dim ``full`` sliced."""
    if isinstance(obj, Tensor):
        return obj[:b] if obj.dim() > 0 and obj.shape[0] == full and full > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, b, full) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, b, full) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, b, full) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _norm_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules()
            if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}


def _mask_of(cw: CompressedWeight) -> Tensor:
    if cw.mask is not None:
        return cw.mask.bool()
    return (cw.sparse if cw.is_factored else cw.dense) != 0


class _Stop(Exception):
    pass


def _attention_module(block: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the block's child whose class name contains 'Attention'."""
    found = [(n, m) for n, m in block.named_children() if "attention" in type(m).__name__.lower()]
    if len(found) != 1:
        raise ValueError(f"recon_parts 'attn_mlp': {type(block).__name__} has {len(found)} children whose class name contains "
                         f"'Attention' ({[n for n, _ in found]}); need exactly one")
    return found[0]


def reconstruct_block(
    block: nn.Module,
    compressed: dict[str, CompressedWeight],
    hidden: list[Tensor],
    kwargs_for: Callable[[Tensor], dict],
    targets: list[Tensor],
    cfg: Any,
    device: torch.device | str,
    dense_hidden: list[Tensor] | None = None,
) -> tuple[dict[str, CompressedWeight], dict[str, Any]]:
    """Optimise the kept weights of ``block``'s compressed linears so the block matches ``targets``.

    block:      a decoder block still holding its original dense linears (any float dtype), or a
                ``BlockChain`` of consecutive blocks (``recon_window``) fitted together.
    compressed: {qualified linear name in ``block.named_modules()``: the method's answer}, dense masked
                (``dense`` + ``mask``) or factored (``sparse`` + ``mask``, ``U`` [out, r], ``V`` [r, in]).
    hidden:     calibration inputs of the block, [B, L, d] per batch; ``kwargs_for(h)`` the keyword
                arguments of ``block(h, **kwargs)`` for a batch (an output tuple's [0] is used).
    targets:    the dense block's outputs, one [B, L, d] per batch of ``hidden``.
    cfg:        the keys of ``KEYS``.
    device:     where to train (the block is moved there and back).
    dense_hidden: the dense model's own inputs of the block, one per batch of ``hidden``; needed for
                ``recon_dense_inputs`` > 0 and for ``recon_parts 'attn_mlp'`` with ``recon_target 'dense_model'``.

    Returns ({name: CompressedWeight with the same mask bit for bit, exact zeros off it, updated values
    and U/V, in the given dtypes}, info) with info: loss_before, loss_after (MSE over all windows),
    rel_loss_before/after (divided by the targets' mean square), epochs, steps, seconds, lr, schedule,
    trainable_params, norms_trained, reverted, and per stage (``stages``) its part, epochs run, steps
    and held-out losses.
    """
    t0 = time.time()
    device = torch.device(device)
    target_kind = str(KEYS.value(cfg, "recon_target"))
    if target_kind not in TARGETS:
        raise ValueError(f"config key 'recon_target': got {target_kind!r}; allowed values: {', '.join(map(repr, TARGETS))}")
    schedule = str(KEYS.value(cfg, "recon_schedule"))
    if schedule not in SCHEDULES:
        raise ValueError(f"config key 'recon_schedule': got {schedule!r}; allowed values: {', '.join(map(repr, SCHEDULES))}")
    parts_kind = str(KEYS.value(cfg, "recon_parts"))
    if parts_kind not in PARTS:
        raise ValueError(f"config key 'recon_parts': got {parts_kind!r}; allowed values: {', '.join(map(repr, PARTS))}")
    lr, epochs, bs = float(KEYS.value(cfg, "recon_lr")), int(KEYS.value(cfg, "recon_epochs")), int(KEYS.value(cfg, "recon_batch_size"))
    if bs < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"recon_batch_size ({bs}) must be >= 1, recon_epochs ({epochs}) >= 0, recon_lr ({lr}) > 0")
    alpha, decay = float(KEYS.value(cfg, "recon_dense_inputs")), bool(KEYS.value(cfg, "recon_dense_inputs_decay"))
    share = float(KEYS.value(cfg, "recon_holdout"))
    patience = int(KEYS.value(cfg, "recon_patience"))
    if not (0.0 <= alpha <= 1.0 and 0.0 <= share < 1.0):
        raise ValueError(f"recon_dense_inputs ({alpha}) must lie in [0, 1], recon_holdout ({share}) in [0, 1)")
    train_norms = bool(KEYS.value(cfg, "recon_norms"))
    if len(hidden) != len(targets):
        raise ValueError(f"{len(hidden)} input batches but {len(targets)} target batches")
    if (alpha > 0 or (parts_kind == "attn_mlp" and target_kind == "dense_model")) and (dense_hidden is None or len(dense_hidden) != len(hidden)):
        raise ValueError("recon_dense_inputs > 0, or recon_parts 'attn_mlp' with recon_target 'dense_model', needs the dense model's "
                         "inputs of the block (dense_hidden), one per batch")
    if parts_kind == "attn_mlp" and isinstance(block, BlockChain):
        raise ValueError("recon_parts 'attn_mlp' fits one block at a time; set recon_window 1")

    modules = dict(block.named_modules())
    originals: dict[str, nn.Linear] = {}
    swapped: dict[str, MaskedLinear] = {}
    for name, cw in compressed.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name!r} is not a linear layer of the block")
        part = cw.sparse if cw.is_factored else cw.dense
        if part is None or tuple(part.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{name}: compressed weight of shape {None if part is None else tuple(part.shape)}, layer {tuple(lin.weight.shape)}")
        originals[name] = lin
        swapped[name] = MaskedLinear(part, _mask_of(cw).to(part.device), cw.U, cw.V, lin.bias)
    attn_name = _attention_module(block)[0] if parts_kind == "attn_mlp" else ""
    # a frozen dense copy when the training targets are not the given ones
    need_ref = parts_kind == "attn_mlp" or (alpha > 0 and target_kind == "dense_block")
    reference = copy.deepcopy(block).to(device).requires_grad_(False) if need_ref else None

    param_device = next(block.parameters()).device
    requires = {n: p.requires_grad for n, p in block.named_parameters()}
    norms = _norm_modules(block) if train_norms else {}
    norm_saved = {n: m.weight.detach().clone() for n, m in norms.items()}
    block.to(device)
    for p in block.parameters():
        p.requires_grad_(False)
    for name, m in swapped.items():
        m.to(device)
        set_module(block, name, m)
    stages_info: list[dict[str, Any]] = []
    try:
        norm_master = {n: m.weight.detach().to(torch.float32).clone().requires_grad_(True) for n, m in norms.items()}
        for m in norms.values():
            m.weight.requires_grad_(True)
        params = [p for m in swapped.values() for p in m.parameters()] + list(norm_master.values())
        if parts_kind == "attn_mlp":
            in_attn = [n for n in swapped if n.startswith(attn_name + ".")]
            stages = [("attention", [p for n in in_attn for p in swapped[n].parameters()] + list(norm_master.values())),
                      ("mlp", [p for n, m in swapped.items() if n not in in_attn for p in m.parameters()] + list(norm_master.values()))]
        else:
            stages = [("block", params)]

        # windows: all batches' rows in one pool (equal lengths, no padding: the keyword arguments
        # depend on the number of windows only, taken from the largest batch and sliced)
        largest = max(range(len(hidden)), key=lambda i: hidden[i].shape[0])
        full_kwargs = kwargs_for(hidden[largest])
        full = hidden[largest].shape[0]
        bs = min(bs, full)  # no more windows per step than the largest batch the arguments were captured for
        kw_cache: dict[int, dict] = {}

        def kwargs_of(b: int) -> dict:
            if b not in kw_cache:
                kw_cache[b] = _to(_slice_batch(full_kwargs, b, full), device)
            return kw_cache[b]

        def run(h: Tensor) -> Tensor:
            return _output(block(h, **kwargs_of(h.shape[0])))

        def attention_residual(module: nn.Module, h: Tensor, complete: bool) -> tuple[Tensor | None, Tensor]:
            """(the module's output unless it is stopped, h + its attention module's output)."""
            seen: list[Tensor] = []
            target_attn = module.get_submodule(attn_name)

            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                seen.append(_output(out))
                if not complete:
                    raise _Stop

            handle = target_attn.register_forward_hook(hook)
            try:
                y = _output(module(h, **kwargs_of(h.shape[0])))
            except _Stop:
                y = None
            finally:
                handle.remove()
            return y, h.float() + seen[0].float()

        def sync_norms() -> None:
            for n, m in norms.items():  # the norm weights run in the block's dtype, from float32 masters
                m.weight.data.copy_(norm_master[n].detach())

        @torch.no_grad()
        def total_loss(pick: list[tuple[int, int]] | None = None) -> tuple[float, float]:
            err = ref = 0.0
            count = 0
            if pick is None:
                pairs = zip(hidden, targets)
            else:  # chunks no larger than the batch the keyword arguments were captured for
                chunks = [pick[k : k + full] for k in range(0, len(pick), full)]
                pairs = [(torch.stack([hidden[i][j] for i, j in c]), torch.stack([targets[i][j] for i, j in c])) for c in chunks]
            for h, y in pairs:
                out = run(h.to(device)).float()
                yy = y.to(device).float()
                err += float((out - yy).square().sum(dtype=torch.float64))
                ref += float(yy.square().sum(dtype=torch.float64))
                count += yy.numel()
            return err / max(count, 1), ref / max(count, 1)

        loss_before, ref_ms = total_loss()
        windows = [(i, j) for i, h in enumerate(hidden) for j in range(h.shape[0])]
        held = holdout_windows(len(windows), share)
        held_pick = [windows[k] for k in held]
        if held:
            kept_out = set(held)
            windows = [w for k, w in enumerate(windows) if k not in kept_out]
        steps_per_epoch = math.ceil(len(windows) / bs) if windows else 0
        dtype_in = hidden[0].dtype if hidden else torch.float32
        data_cache: dict[tuple[float, str], tuple[list[Tensor], list[Tensor]]] = {}

        @torch.no_grad()
        def data_for(epoch: int, stage: str) -> tuple[list[Tensor], list[Tensor]]:
            """(inputs, targets) per batch for one epoch of a stage."""
            a = alpha * (1.0 - epoch / max(epochs, 1)) if decay else alpha
            if (a, stage) in data_cache:
                return data_cache[(a, stage)]
            data_cache.clear()
            xs = hidden if a == 0 else [((1 - a) * h.float() + a * hd.to(h.device).float()).to(h.dtype) for h, hd in zip(hidden, dense_hidden)]
            zs = xs if target_kind == "dense_block" else dense_hidden
            if stage == "attention":
                ys = [attention_residual(reference, z.to(device), False)[1] for z in zs]
            elif target_kind == "dense_model" or a == 0:
                ys = targets
            else:
                ys = [_output(reference(z.to(device), **kwargs_of(z.shape[0]))) for z in zs]
            data_cache[(a, stage)] = (xs, ys)
            return xs, ys

        def snapshot() -> list[Tensor]:
            return [p.detach().clone() for p in params]

        @torch.no_grad()
        def restore(saved: list[Tensor]) -> None:
            for p, v in zip(params, saved):
                p.copy_(v)
            sync_norms()

        step = 0
        for stage, stage_params in stages:
            total_steps = steps_per_epoch * epochs if stage_params else 0  # nothing to train: measure only
            opt = torch.optim.Adam(stage_params or [torch.zeros(1, requires_grad=True)], lr=lr)
            decay_of = {"cosine": lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total_steps, 1))),
                        "linear": lambda s: max(0.0, 1.0 - s / max(total_steps, 1)),
                        "constant": lambda s: 1.0}[schedule]
            sched = torch.optim.lr_scheduler.LambdaLR(opt, decay_of)
            gen = torch.Generator().manual_seed(SEED)
            stop = EarlyStop(total_loss(held_pick)[0], snapshot(), patience) if held and total_steps else None
            ran = 0
            with torch.enable_grad(), tqdm(total=total_steps, desc=f"reconstruct ({stage})" if len(stages) > 1 else "reconstruct",
                                           leave=False, disable=None) as bar:
                for epoch in range(epochs if total_steps else 0):
                    xs, ys = data_for(epoch, stage)
                    order = torch.randperm(len(windows), generator=gen).tolist()
                    for s0 in range(0, len(order), bs):
                        pick = [windows[k] for k in order[s0 : s0 + bs]]
                        h = torch.stack([xs[i][j] for i, j in pick]).to(device, dtype_in)
                        y = torch.stack([ys[i][j] for i, j in pick]).to(device, torch.float32)
                        for n, m in norms.items():
                            m.weight.data.copy_(norm_master[n].detach())
                            m.weight.grad = None
                        opt.zero_grad(set_to_none=True)
                        pred = attention_residual(block, h, False)[1] if stage == "attention" else run(h).float()
                        loss = F.mse_loss(pred, y)
                        loss.backward()
                        for m in swapped.values():
                            if m.weight.grad is not None:
                                m.weight.grad.mul_(m.mask)
                        for n, m in norms.items():
                            g = m.weight.grad
                            norm_master[n].grad = None if g is None else g.to(torch.float32)
                        opt.step()
                        sched.step()
                        for m in swapped.values():
                            m.remask_()
                        step += 1
                        bar.update(1)
                    ran += 1
                    if stop is not None:
                        sync_norms()
                        if stop.should_stop(ran, total_loss(held_pick)[0], snapshot):
                            break
            if stop is not None and not stop.best_is_current():
                restore(stop.best_state)
            stages_info.append({"part": stage, "epochs_run": ran, "stopped_early": stop is not None and stop.stopped_at is not None,
                                **({"heldout_loss_before": stop.loss_before, "heldout_loss_best": stop.best_loss,
                                    "best_epoch": stop.best_epoch, "patience": patience} if stop is not None else {})})
        with torch.no_grad():
            for n, m in norms.items():
                m.weight.data.copy_(norm_master[n])
        loss_after, _ = total_loss()
        reverted = loss_after > loss_before
        if reverted:
            log.warning("reconstruct: loss rose from %.4g to %.4g (recon_lr %g too large?); keeping the given weights", loss_before, loss_after, lr)
        with torch.no_grad():
            out: dict[str, CompressedWeight] = {}
            for name, cw in compressed.items():
                m = swapped[name]
                mask = _mask_of(cw)
                if reverted:
                    out[name] = cw
                    continue
                info = {**cw.info, "reconstructed": True}
                zero = torch.zeros((), device=mask.device)
                if cw.is_factored:
                    S = torch.where(mask, m.weight.detach().to(mask.device), zero).to(cw.sparse.dtype)
                    U = m.U.detach().to(cw.U.device, cw.U.dtype) if m.U is not None else cw.U
                    V = m.V.detach().to(cw.V.device, cw.V.dtype) if m.V is not None else cw.V
                    out[name] = CompressedWeight(sparse=S, U=U, V=V, info=info, mask=cw.mask if cw.mask is not None else mask)
                else:
                    D = torch.where(mask, m.weight.detach().to(mask.device), zero).to(cw.dense.dtype)
                    out[name] = CompressedWeight(dense=D, info=info, mask=cw.mask if cw.mask is not None else mask)
            if reverted:
                for n, m in norms.items():
                    m.weight.data.copy_(norm_saved[n].to(m.weight.device))
    finally:
        for name, lin in originals.items():
            set_module(block, name, lin)
        for n, p in block.named_parameters():
            p.requires_grad_(requires.get(n, p.requires_grad))
            p.grad = None
        block.to(param_device)
        del reference
    seconds = time.time() - t0
    info = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "rel_loss_before": loss_before / ref_ms if ref_ms > 0 else None,
        "rel_loss_after": loss_after / ref_ms if ref_ms > 0 else None,
        "epochs": epochs,
        "steps": step,
        "seconds": seconds,
        "lr": lr,
        "schedule": schedule,
        "batch_size": bs,
        "target": target_kind,
        "trainable_params": int(sum(int(m.mask.sum()) + (m.U.numel() + m.V.numel() if m.U is not None else 0) for m in swapped.values())
                                + sum(p.numel() for p in norm_master.values())),
        "norms_trained": sorted(norms) if not reverted else [],
        "reverted": reverted,
        "parts": parts_kind,
        "dense_inputs": alpha,
        "dense_inputs_decay": decay,
        "heldout_windows": len(held),
        "stages": stages_info,
    }
    log.info("reconstruct: block loss %.4g -> %.4g (relative %.4g -> %.4g), %d steps, %.1fs%s", loss_before, loss_after,
             info["rel_loss_before"] or 0.0, info["rel_loss_after"] or 0.0, step, seconds, " (reverted)" if reverted else "")
    return out, info


def target(cfg: Any) -> str:
    """What the framework passes as ``targets``: the value of ``recon_target``."""
    return str(KEYS.value(cfg, "recon_target"))


def window(cfg: Any) -> int:
    """How many consecutive blocks are fitted together: the value of ``recon_window``."""
    return int(KEYS.value(cfg, "recon_window"))


def dense_inputs(cfg: Any) -> bool:
    """Whether the framework must pass the dense model's own inputs of the block (``dense_hidden``)."""
    return float(KEYS.value(cfg, "recon_dense_inputs")) > 0 or (
        str(KEYS.value(cfg, "recon_parts")) == "attn_mlp" and target(cfg) == "dense_model")


def validate(cfg: Any) -> None:
    if target(cfg) == "dense_model" and cfg.get("checkpoint_blocks"):
        raise ConfigError("recon_target", "'dense_model' streams the dense model beside the compressed one and that stream "
                                          "is not checkpointed; set checkpoint_blocks False or recon_target 'dense_block'")
    if dense_inputs(cfg) and cfg.get("checkpoint_blocks"):
        raise ConfigError("recon_dense_inputs", "streams the dense model beside the compressed one and that stream is not "
                                                "checkpointed; set checkpoint_blocks False or recon_dense_inputs 0")
    if KEYS.value(cfg, "recon_dense_inputs_decay") and not float(KEYS.value(cfg, "recon_dense_inputs")) > 0:
        raise ConfigError("recon_dense_inputs_decay", "decays recon_dense_inputs, which is 0; set recon_dense_inputs in (0, 1] or leave this False")
    w = window(cfg)
    for key in ("checkpoint_blocks", "lazy_load"):
        if w > 1 and cfg.get(key):
            raise ConfigError("recon_window", f"got {w}: a window of blocks is fitted after its last block is compressed, which "
                                              f"{key} does not wait for; set recon_window 1 or {key} False")
    if w > 1 and KEYS.value(cfg, "recon_parts") == "attn_mlp":
        raise ConfigError("recon_parts", f"'attn_mlp' fits one block at a time, but recon_window is {w}; set recon_window 1 or recon_parts 'block'")
    if float(KEYS.value(cfg, "recon_holdout")) > 0 and int(cfg.get("cal_nsamples", 2)) < 2:
        raise ConfigError("recon_holdout", f"holds out calibration windows, but cal_nsamples is {cfg.get('cal_nsamples')}; "
                                           "use at least 2 windows or recon_holdout 0")
    check_patience("recon_patience", int(KEYS.value(cfg, "recon_patience")), "recon_holdout", float(KEYS.value(cfg, "recon_holdout")))


def check_blocks(cfg: Any, n_blocks: int) -> None:
    """``recon_window`` is at most the model's number of blocks (the preflight calls this before any model loads)."""
    w = window(cfg)
    if w > n_blocks:
        raise ConfigError("recon_window", f"got {w}, but the model has {n_blocks} blocks; allowed values: 1 to {n_blocks}")


def workspace(block_params: int, hidden: int, intermediate: int, cfg: Any) -> int:
    """Bytes held while reconstructing one window of ``recon_window`` blocks: float32 master weights,
    masks, gradients and Adam's two moments (5 per parameter), one step's autograd activations (about
    12 hidden-wide and 4 intermediate-wide tensors per token of a batch of windows, per block), and a
    frozen dense copy of the block when the targets are computed here (``recon_parts 'attn_mlp'`` or
    dense inputs with the dense-block target)."""
    tokens = int(KEYS.value(cfg, "recon_batch_size")) * int(cfg["cal_seqlen"])
    w = window(cfg)
    reference = KEYS.value(cfg, "recon_parts") == "attn_mlp" or (float(KEYS.value(cfg, "recon_dense_inputs")) > 0 and target(cfg) == "dense_block")
    return w * (5 * block_params * 4 + tokens * (12 * hidden + 4 * intermediate) * 4) + (block_params * 4 if reference else 0)


BLOCK_UPDATE = BlockUpdate(
    "reconstruct", reconstruct_block, keys=KEYS, target=target, validate=validate, workspace=workspace,
    window=window, dense_inputs=dense_inputs, check_blocks=check_blocks,
    doc="after a block's linears are compressed, Adam on its kept weights (masks held exactly; low-rank factors and, "
        "optionally, norms trained) to match the dense block's outputs on the compressed model's inputs "
        "(or, recon_target 'dense_model', the dense model's own activations); optionally several blocks together, "
        "on inputs blended with the dense model's, attention and MLP in turn, with early stopping on held-out windows",
    paper="3BASiL (Makni et al., NeurIPS 2025), transformer-level matching; Shin et al. (EMNLP 2024), cross-block "
          "reconstruction and global propagation",
)

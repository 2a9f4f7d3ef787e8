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
  each epoch, seeded), schedule ``cosine``
  (to 0 over all steps) or ``constant``.
* The loss over all windows is measured before and after; if training made it worse (a too-large
  learning rate), the given weights are returned unchanged (``info['reverted'] = True``).

On return the block holds its original modules again (the caller writes the returned weights back).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from factored.module import set_module
from oats.interface import BLOCK_TARGETS, BlockUpdate, CompressedWeight
from oats.keys import ConfigError, Key, KeyTable, choice, positive

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
TARGETS = BLOCK_TARGETS

# Its config keys (validated and hashed only when block_update is 'reconstruct').
KEYS = KeyTable({
    "recon_lr": Key(1e-4, (float,), "block reconstruction: Adam learning rate", positive),
    "recon_epochs": Key(10, (int,), "block reconstruction: passes over the calibration windows", positive),
    "recon_batch_size": Key(4, (int,), "block reconstruction: calibration windows per Adam step", positive),
    "recon_schedule": Key("cosine", (str,), "block reconstruction: learning-rate schedule, `cosine` (to 0) or `constant`", choice(*SCHEDULES)),
    "recon_norms": Key(False, (bool,), "block reconstruction: also train the block's RMSNorm/LayerNorm weights (written back in place)"),
    "recon_target": Key("dense_block", (str,), "block reconstruction target: `dense_block` (the dense block's outputs on the same, compressed-model inputs) or `dense_model` (the dense model's own activations at the block's output)", choice(*TARGETS)),
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


def reconstruct_block(
    block: nn.Module,
    compressed: dict[str, CompressedWeight],
    hidden: list[Tensor],
    kwargs_for: Callable[[Tensor], dict],
    targets: list[Tensor],
    cfg: Any,
    device: torch.device | str,
) -> tuple[dict[str, CompressedWeight], dict[str, Any]]:
    """Optimise the kept weights of ``block``'s compressed linears so the block matches ``targets``.

    block:      a decoder block still holding its original dense linears (any float dtype).
    compressed: {qualified linear name in ``block.named_modules()``: the method's answer}, dense masked
                (``dense`` + ``mask``) or factored (``sparse`` + ``mask``, ``U`` [out, r], ``V`` [r, in]).
    hidden:     calibration inputs of the block, [B, L, d] per batch; ``kwargs_for(h)`` the keyword
                arguments of ``block(h, **kwargs)`` for a batch (an output tuple's [0] is used).
    targets:    the dense block's outputs, one [B, L, d] per batch of ``hidden``.
    cfg:        recon_lr, recon_epochs, recon_batch_size, recon_schedule, recon_norms, recon_target.
    device:     where to train (the block is moved there and back).

    Returns ({name: CompressedWeight with the same mask bit for bit, exact zeros off it, updated values
    and U/V, in the given dtypes}, info) with info: loss_before, loss_after (MSE over all windows),
    rel_loss_before/after (divided by the targets' mean square), epochs, steps, seconds, lr, schedule,
    trainable_params, norms_trained, reverted.
    """
    t0 = time.time()
    device = torch.device(device)
    target_kind = str(KEYS.value(cfg, "recon_target"))
    if target_kind not in TARGETS:
        raise ValueError(f"config key 'recon_target': got {target_kind!r}; allowed values: {', '.join(map(repr, TARGETS))}")
    schedule = str(KEYS.value(cfg, "recon_schedule"))
    if schedule not in SCHEDULES:
        raise ValueError(f"config key 'recon_schedule': got {schedule!r}; allowed values: {', '.join(map(repr, SCHEDULES))}")
    lr, epochs, bs = float(KEYS.value(cfg, "recon_lr")), int(KEYS.value(cfg, "recon_epochs")), int(KEYS.value(cfg, "recon_batch_size"))
    if bs < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"recon_batch_size ({bs}) must be >= 1, recon_epochs ({epochs}) >= 0, recon_lr ({lr}) > 0")
    train_norms = bool(KEYS.value(cfg, "recon_norms"))
    if len(hidden) != len(targets):
        raise ValueError(f"{len(hidden)} input batches but {len(targets)} target batches")

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
    try:
        norm_master = {n: m.weight.detach().to(torch.float32).clone().requires_grad_(True) for n, m in norms.items()}
        for m in norms.values():
            m.weight.requires_grad_(True)
        params = [p for m in swapped.values() for p in m.parameters()] + list(norm_master.values())

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

        @torch.no_grad()
        def total_loss() -> tuple[float, float]:
            err = ref = 0.0
            count = 0
            for h, y in zip(hidden, targets):
                out = run(h.to(device)).float()
                yy = y.to(device).float()
                err += float((out - yy).square().sum(dtype=torch.float64))
                ref += float(yy.square().sum(dtype=torch.float64))
                count += yy.numel()
            return err / max(count, 1), ref / max(count, 1)

        loss_before, ref_ms = total_loss()
        windows = [(i, j) for i, h in enumerate(hidden) for j in range(h.shape[0])]
        steps_per_epoch = math.ceil(len(windows) / bs) if windows else 0
        total_steps = steps_per_epoch * epochs if params else 0  # nothing to train: measure only
        opt = torch.optim.Adam(params or [torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total_steps, 1)))) if schedule == "cosine" else (lambda s: 1.0))
        gen = torch.Generator().manual_seed(SEED)
        dtype_in = hidden[0].dtype if hidden else torch.float32
        step = 0
        with torch.enable_grad(), tqdm(total=total_steps, desc="reconstruct", leave=False, disable=None) as bar:
            for _ in range(epochs if total_steps else 0):
                order = torch.randperm(len(windows), generator=gen).tolist()
                for s0 in range(0, len(order), bs):
                    pick = [windows[k] for k in order[s0 : s0 + bs]]
                    h = torch.stack([hidden[i][j] for i, j in pick]).to(device, dtype_in)
                    y = torch.stack([targets[i][j] for i, j in pick]).to(device, torch.float32)
                    for n, m in norms.items():  # the norm weights run in the block's dtype, from float32 masters
                        m.weight.data.copy_(norm_master[n].detach())
                        m.weight.grad = None
                    opt.zero_grad(set_to_none=True)
                    loss = F.mse_loss(run(h).float(), y)
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
    }
    log.info("reconstruct: block loss %.4g -> %.4g (relative %.4g -> %.4g), %d steps, %.1fs%s", loss_before, loss_after,
             info["rel_loss_before"] or 0.0, info["rel_loss_after"] or 0.0, step, seconds, " (reverted)" if reverted else "")
    return out, info


def target(cfg: Any) -> str:
    """What the framework passes as ``targets``: the value of ``recon_target``."""
    return str(KEYS.value(cfg, "recon_target"))


def validate(cfg: Any) -> None:
    if target(cfg) == "dense_model" and cfg.get("checkpoint_blocks"):
        raise ConfigError("recon_target", "'dense_model' streams the dense model beside the compressed one and that stream "
                                          "is not checkpointed; set checkpoint_blocks False or recon_target 'dense_block'")


def workspace(block_params: int, hidden: int, intermediate: int, cfg: Any) -> int:
    """Bytes held while reconstructing one block: float32 master weights, masks, gradients and Adam's two
    moments (5 per parameter), and one step's autograd activations (about 12 hidden-wide and 4
    intermediate-wide tensors per token of a batch of windows)."""
    tokens = int(KEYS.value(cfg, "recon_batch_size")) * int(cfg["cal_seqlen"])
    return 5 * block_params * 4 + tokens * (12 * hidden + 4 * intermediate) * 4


BLOCK_UPDATE = BlockUpdate(
    "reconstruct", reconstruct_block, keys=KEYS, target=target, validate=validate, workspace=workspace,
    doc="after a block's linears are compressed, Adam on its kept weights (masks held exactly; low-rank factors and, "
        "optionally, norms trained) to match the dense block's outputs on the compressed model's inputs "
        "(or, recon_target 'dense_model', the dense model's own activations)",
    paper="3BASiL (Makni et al., NeurIPS 2025), transformer-level matching",
)

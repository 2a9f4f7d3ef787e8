"""Block-by-block streaming of calibration data through a decoder, as the Wanda/SparseGPT/OATS
reference code does, with input statistics gathered by forward hooks.

1. ``capture_inputs`` runs the calibration windows through everything before the first block and
   catches the first block's inputs (hidden states plus the keyword arguments the model passes it:
   attention mask, position ids/embeddings...). Works for any architecture whose blocks live in a
   ``ModuleList`` (see ``oats.architectures``).
2. ``stream`` moves one block at a time to the compute device, collects each linear layer's input
   statistics over all windows (``StatsCollector``), hands them to a per-block callback (which may
   compress the block in place), then runs the windows through the (now compressed) block to get
   the next block's inputs, and moves the block back to the CPU. The calibration hidden states and the
   statistics may live on another device than the block (``stats_device``: a 70B block on one GPU, its
   activations and Gram matrices on the CPU or a second GPU); each batch hops to the block's device
   for its forward and its output hops back.
3. ``replay_outputs`` runs the model's own forward with its blocks replaced by a replay of streamed
   hidden states, so the head (final norm, LM head) needs no architecture knowledge: streamed
   logits and streamed evaluation (``lazy_load``) both go through it.

``stream`` is the one loop: statistics passes (OWL), the compressing pass and streamed evaluation
all call it, over a ``WeightSource`` that loads and frees weights when they are read lazily from
shards (``oats.weights``).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oats.architectures import architecture_of, get_blocks, linear_layers
from oats.interface import STATS_KINDS, InputStats

log = logging.getLogger(__name__)


class _Caught(Exception):
    pass


class _StandIn(nn.Module):
    """Stands in for a block in the model's own forward; reads of block attributes (attention_type...)
    go to the block it replaces."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _Catcher(_StandIn):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self, block: nn.Module, hidden_device: torch.device | None = None):
        super().__init__(block)
        self.hidden_device = hidden_device
        self.hidden: list[Tensor] = []
        self.kwargs: dict[int, dict[str, Any]] = {}  # by batch size

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:  # e.g. ViT/DINOv2 encoders call `layer(hidden_states, attention_mask)`: name them as keywords
            kwargs = _as_keywords(self.block, hidden_states, args, kwargs)
        self.hidden.append(hidden_states if self.hidden_device is None else hidden_states.to(self.hidden_device))
        # Windows have equal length and no padding, so the mask/positions depend on the batch size only.
        self.kwargs.setdefault(hidden_states.shape[0], kwargs)
        raise _Caught


def _as_keywords(block: nn.Module, hidden_states: Tensor, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments after the hidden states, bound to their parameter names in ``block.forward``."""
    try:
        bound = inspect.signature(block.forward).bind(hidden_states, *args, **kwargs)
    except TypeError as e:
        raise RuntimeError(f"{type(block).__name__}: cannot name its positional arguments ({e})") from e
    names = list(bound.arguments)
    out = {k: v for k, v in bound.arguments.items() if k != names[0]}
    var_kw = [p.name for p in inspect.signature(block.forward).parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    for name in var_kw:  # **kwargs come back as one dict: spread them again
        out.update(out.pop(name, {}))
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL and p.name in out for p in inspect.signature(block.forward).parameters.values()):
        raise RuntimeError(f"{type(block).__name__}: takes *args; oats needs every argument but the hidden states by name")
    return out


@dataclass
class BlockInputs:
    """The inputs of one block for all calibration batches: hidden [B, L, d] per batch, and the keyword
    arguments the model passes its blocks (attention mask, positions...), by batch size."""

    hidden: list[Tensor]
    kwargs: dict[int, dict[str, Any]]

    def kwargs_for(self, hidden: Tensor) -> dict[str, Any]:
        return self.kwargs[hidden.shape[0]]

    def to(self, device: torch.device) -> "BlockInputs":
        """The hidden states on ``device`` (the keyword arguments stay with the block's device)."""
        return BlockInputs([h.to(device) for h in self.hidden], self.kwargs)


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past", "cache_position")}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: Tensor, device: torch.device, batch_size: int,
                   hidden_device: torch.device | None = None) -> BlockInputs:
    """Run ``input_ids`` [n, L] through the embeddings and catch block 0's inputs (computed on
    ``device``; the hidden states kept on ``hidden_device``, default ``device``, batch by batch).

    Everything but the blocks is moved to ``device`` for this and moved back afterwards.
    """
    blocks = get_blocks(model)
    arch = architecture_of(model)
    originals = list(blocks)
    move_non_blocks(model, device)
    catcher = _Catcher(blocks[0], hidden_device)
    blocks[0] = catcher
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(**arch.inputs(batch))
            except _Caught:
                pass
    finally:
        blocks[0] = originals[0]
        move_non_blocks(model, torch.device("cpu"))
    if not catcher.kwargs:
        raise RuntimeError("block 0 was never called; is this a decoder-only model?")
    return BlockInputs(catcher.hidden, {bs: _clean_kwargs(kw) for bs, kw in catcher.kwargs.items()})


def move_non_blocks(model: nn.Module, device: torch.device) -> None:
    """Move everything but the decoder blocks (embeddings, final norm, LM head...) to ``device``."""
    blocks = get_blocks(model)
    saved = list(blocks)
    for k in range(len(blocks)):
        blocks[k] = nn.Identity()
    try:
        model.to(device)
    finally:
        for k, b in enumerate(saved):
            blocks[k] = b


def run_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any], device: torch.device | None = None) -> Tensor:
    """The block's output hidden states for ``hidden``; with ``device`` (where the block is), the input
    is moved there for the forward and the output comes back to the input's device."""
    x = hidden if device is None else hidden.to(device)
    out = block(x, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out if device is None else out.to(hidden.device)


class StatsCollector:
    """Forward hooks accumulating each linear layer's input statistics over calibration batches.

    kind 'diag' keeps sum_t x_t^2 per input feature; 'gram' also keeps sum_t x_t^T x_t.
    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator: the aliasing is
    read off the first batch by tensor identity and reused afterwards.

    device: where the accumulators live (default: where the inputs are); ``stats(name)`` hands them
    out on ``serve_device`` (default: where they live), so a method sees its weight and its statistics
    on one device wherever the accumulators are kept.
    """

    def __init__(self, layers: dict[str, nn.Linear], kind: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, serve_device: torch.device | None = None):
        if kind not in ("diag", "gram"):
            raise ValueError(f"statistics kind {kind!r}; allowed: 'diag', 'gram'")
        self.layers, self.kind, self.dtype = layers, kind, dtype
        self.device, self.serve_device = device, serve_device
        self.owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self.sq: dict[str, Tensor] = {}
        self.gram: dict[str, Tensor] = {}
        self.n: dict[str, int] = {}
        self._batch_inputs: list[tuple[Tensor, str]] = []
        self._first_batch = True
        self._handles: list[Any] = []

    def __enter__(self) -> "StatsCollector":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def end_batch(self) -> None:
        self._batch_inputs.clear()  # also drops the references that keep identities meaningful
        self._first_batch = False

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            if self._first_batch:
                for seen, owner in self._batch_inputs:
                    if seen is x:
                        self.owner[name] = owner
                        return
                self.owner[name] = name
                self._batch_inputs.append((x, name))
            elif self.owner[name] != name:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).to(device=self.device or x.device, dtype=self.dtype)
            if name not in self.sq:
                self.sq[name] = torch.zeros(x2.shape[1], dtype=self.dtype, device=x2.device)
                self.n[name] = 0
                if self.kind == "gram":
                    self.gram[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype, device=x2.device)
            self.sq[name] += (x2 * x2).sum(0)
            self.n[name] += x2.shape[0]
            if self.kind == "gram":
                self.gram[name].addmm_(x2.T, x2)

        return hook

    def stats(self, name: str) -> InputStats:
        o = self.owner[name]
        gram = self.gram.get(o)
        if self.serve_device is None:
            return InputStats(sq_norms=self.sq[o], n_tokens=self.n[o], gram=gram)
        return InputStats(sq_norms=self.sq[o].to(self.serve_device), n_tokens=self.n[o],
                          gram=None if gram is None else gram.to(self.serve_device))


class WeightSource(Protocol):
    """Where the streamed model's weights come from (``oats.weights``): the loops call ``load_block(i)``
    before block i runs and ``free_block(i)`` after it (and after ``after_block``), ``load_head`` /
    ``free_head`` around the embeddings and the head. In memory all four do nothing."""

    def load_block(self, i: int) -> None: ...
    def free_block(self, i: int) -> None: ...
    def load_head(self) -> None: ...
    def free_head(self) -> None: ...


class Resident:
    """The weights are all in memory already: nothing to load or free."""

    def load_block(self, i: int) -> None:
        pass

    def free_block(self, i: int) -> None:
        pass

    def load_head(self) -> None:
        pass

    def free_head(self) -> None:
        pass


# on_block(i, block, linears, collector, inputs): inputs are block i's BlockInputs (for block updates);
# it may return other inputs for block i, from which its outputs are then computed (a block update
# that changed earlier blocks too), or None
BlockFn = Callable[[int, nn.Module, dict[str, nn.Linear], "StatsCollector | None", BlockInputs], "BlockInputs | None"]


@torch.no_grad()
def stream(
    model: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    stats_kind: str,
    on_block: BlockFn,
    stats_dtype: torch.dtype = torch.float32,
    start_block: int = 0,
    after_block: Callable[[int, nn.Module, BlockInputs], None] | None = None,
    desc: str = "blocks",
    weights: WeightSource | None = None,
    stats_device: torch.device | None = None,
) -> BlockInputs:
    """Stream calibration inputs through the blocks from ``start_block`` on.

    For each block: ``weights.load_block(i)``, statistics of the still-unchanged block (if
    ``stats_kind`` != 'none'), then ``on_block(i, block, linears, collector, inputs)`` (which may modify
    the block in place; if it returns BlockInputs, they replace block i's inputs), then the block's
    outputs on all batches become the next block's inputs.
    ``after_block(i, block, next_inputs)`` sees each finished block (shards, checkpoints, tests), then
    ``weights.free_block(i)``. ``weights`` defaults to the model in memory. The hidden states stay on
    the device they come on (each batch runs on ``device`` and its output comes back); the statistics
    accumulate on ``stats_device`` (default ``device``) and reach ``on_block`` on ``device``. Returns
    the last block's outputs.
    """
    if stats_kind not in STATS_KINDS:
        raise ValueError(f"stats kind {stats_kind!r}; allowed: {STATS_KINDS}")
    weights = Resident() if weights is None else weights
    blocks = get_blocks(model)
    hidden = inputs.hidden
    for i in tqdm(range(start_block, len(blocks)), desc=desc, leave=False):
        weights.load_block(i)
        block = blocks[i].to(device)
        layers = linear_layers(block)
        collector = None
        if stats_kind != "none":
            apart = stats_device is not None and stats_device != device
            collector = StatsCollector(layers, stats_kind, stats_dtype, device=stats_device if apart else None,
                                       serve_device=device if apart else None)
            with collector:
                for h in hidden:
                    run_block(block, h, inputs.kwargs_for(h), device)
                    collector.end_batch()
        replaced = on_block(i, block, layers, collector, BlockInputs(hidden, inputs.kwargs))
        if replaced is not None:
            hidden = replaced.hidden
        del collector
        hidden = [run_block(block, h, inputs.kwargs_for(h), device) for h in hidden]
        blocks[i] = block.to("cpu")
        if after_block is not None:
            after_block(i, blocks[i], BlockInputs(hidden, inputs.kwargs))
        weights.free_block(i)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BlockInputs(hidden, inputs.kwargs)


class _Replay(_StandIn):
    """Stands in for a block during ``replay_outputs``: block 0 returns the streamed output, others pass it on."""

    def __init__(self, block: nn.Module, output: Tensor | None):
        super().__init__(block)
        self.output = output

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return self.output if self.output is not None else hidden_states


@torch.no_grad()
def replay_outputs(model: nn.Module, final: BlockInputs, input_ids: Tensor, device: torch.device,
                   batch_size: int = 1) -> Iterator[tuple[Tensor, Any]]:
    """(batch, model output) per batch of ``input_ids`` [n, L], the last block's streamed outputs
    ``final`` (one hidden tensor per batch) replayed into the model's own forward, so the head runs
    as the model defines it. Everything but the blocks sits on ``device`` meanwhile."""
    blocks = get_blocks(model)
    arch = architecture_of(model)
    originals = list(blocks)
    try:
        move_non_blocks(model, device)
        for j, start in enumerate(range(0, input_ids.shape[0], batch_size)):
            for k in range(len(originals)):
                blocks[k] = _Replay(originals[k], final.hidden[j] if k == 0 else None)
            batch = input_ids[start : start + batch_size].to(device)
            yield batch, model(**arch.inputs(batch))
    finally:
        for k, b in enumerate(originals):
            blocks[k] = b
        move_non_blocks(model, torch.device("cpu"))


@torch.no_grad()
def streamed_outputs(model: nn.Module, input_ids: Tensor, device: torch.device, batch_size: int = 1,
                     weights: WeightSource | None = None, desc: str = "streamed forward") -> Iterator[tuple[Tensor, Any]]:
    """The model's outputs on ``input_ids`` computed one block at a time (never more than one block
    on ``device``): embeddings, then ``stream``, then ``replay_outputs``, the weights loaded and freed
    around each piece by ``weights`` (default: in memory)."""
    weights = Resident() if weights is None else weights
    weights.load_head()
    inputs = capture_inputs(model, input_ids, device, batch_size)
    weights.free_head()
    final = stream(model, inputs, device, "none", lambda *a: None, desc=desc, weights=weights)
    weights.load_head()
    try:
        yield from replay_outputs(model, final, input_ids, device, batch_size)
    finally:
        weights.free_head()


@torch.no_grad()
def streamed_logits(model: nn.Module, input_ids: Tensor, device: torch.device, batch_size: int = 1) -> Tensor:
    """Logits [n, L, vocab] computed one block at a time (never more than one block on ``device``)."""
    return torch.cat([out.logits.cpu() for _, out in streamed_outputs(model, input_ids, device, batch_size)])

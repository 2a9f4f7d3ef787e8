"""The plugin contracts: what the pipeline hands a method and what it gets back, and how each plugin
(method, layerwise, weight update, block update) describes itself.

A method is a pure function of tensors::

    compress_weight(W: [out, in], stats: InputStats, budget: Budget, cfg) -> CompressedWeight

unaware of models, files and devices. The pipeline computes the statistics once per input (layers
reading the same input share them) and writes back whatever the method returns.

Five kinds of plugin, each named like the config key that selects it: ``Method`` (``method``),
``Layerwise`` (``layerwise``), ``WeightUpdate`` (``weight_update``), ``BlockUpdate`` (``block_update``)
and ``ModelUpdate`` (``model_update``).
Every plugin declares its own config keys (``oats.keys.Key``), its cross-key checks (``validate``:
raise ``oats.keys.ConfigError`` naming the key) and the statistics it needs. The framework merges the
common keys with those of the selected plugins, validates and hashes exactly those, and never names
a plugin: what a plugin can combine with is said here, by the plugin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from oats.keys import Key

STATS_KINDS = ("none", "diag", "gram")  # what a plugin needs collected, in increasing cost


@dataclass
class InputStats:
    """Calibration statistics of one linear layer's input x (n_tokens rows of d_in features).

    sq_norms: [d_in], sum over tokens of x_j^2 (float32/float64). ``sqrt(sq_norms)`` is Wanda's ||X_j||_2.
    gram:     [d_in, d_in], sum over tokens of x^T x, or None when the method asked for the diagonal only.
    n_tokens: number of token rows summed.
    """

    sq_norms: Tensor
    n_tokens: int
    gram: Tensor | None = None

    @property
    def second_moment(self) -> Tensor:
        """[d_in] mean of x_j^2 over tokens: OATS's D."""
        return self.sq_norms / max(self.n_tokens, 1)

    @property
    def col_norms(self) -> Tensor:
        """[d_in] ||X_j||_2 over all calibration tokens (Wanda's activation norm)."""
        return self.sq_norms.sqrt()


@dataclass(frozen=True)
class Budget:
    """How much of one layer survives.

    sparsity: fraction of the layer's d_out*d_in parameters removed (OATS: the compression rate,
              counting the low-rank factors' entries as kept parameters).
    nm:       (N, M) when N of every M consecutive weights along the input dimension are kept, else None.
    scope:    'row' or 'layer' for unstructured masks (where weights compete); None = method default.
    """

    sparsity: float
    nm: tuple[int, int] | None = None
    scope: str | None = None


@dataclass
class CompressedWeight:
    """A method's answer for one layer: a dense (pruned) weight, or the OATS factors.

    dense:  [out, in] weight to write back, or None when the answer is factored.
    sparse: [out, in] with exact zeros; U: [out, r]; V: [r, in]; weight ~= sparse + U @ V.
    info:   per-layer facts for the result record (rank, nonzeros, errors...), JSON-serialisable.
    mask:   optional [out, in] bool, True = kept, of ``dense`` (or of ``sparse`` when factored). Weight
            updates (OPTIMA) re-solve exactly these entries; when None they take the nonzeros, so a kept
            weight that happens to be exactly 0 is then treated as pruned.
    """

    dense: Tensor | None = None
    sparse: Tensor | None = None
    U: Tensor | None = None
    V: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None

    def to_dense(self) -> Tensor:
        if self.dense is not None:
            return self.dense
        assert self.sparse is not None
        out = self.sparse.clone()
        if self.U is not None and self.V is not None and self.U.shape[1] > 0:
            out += self.U @ self.V
        return out

    @property
    def is_factored(self) -> bool:
        return self.dense is None

    @classmethod
    def stack_rows(cls, parts: list["CompressedWeight"]) -> "CompressedWeight":
        """One answer for a fused matrix from its logical parts stacked along the output rows
        (Phi-3's qkv_proj = [q; k; v]): dense parts stack; factored parts give
        S = [S_1; S_2; ...], U = blockdiag(U_1, U_2, ...), V = [V_1; V_2; ...], so S + U V is the
        stack of the parts' S_i + U_i V_i. ``info`` holds the parts' infos under 'parts'."""
        if len(parts) == 1:
            return parts[0]
        masks = [p.mask for p in parts]
        mask = torch.cat([m if m is not None else (p.sparse if p.is_factored else p.dense) != 0 for m, p in zip(masks, parts)]) \
            if any(m is not None for m in masks) else None
        info = {"parts": [p.info for p in parts]}
        if not any(p.is_factored for p in parts):
            return cls(dense=torch.cat([p.dense for p in parts]), info=info, mask=mask)
        sparse = torch.cat([p.sparse if p.is_factored else p.dense for p in parts])
        ranks = [p.U.shape[1] if p.is_factored and p.U is not None else 0 for p in parts]
        U = sparse.new_zeros(sparse.shape[0], sum(ranks))
        Vs, row, col = [], 0, 0
        for p, r in zip(parts, ranks):
            n = (p.sparse if p.is_factored else p.dense).shape[0]
            if r:
                U[row : row + n, col : col + r] = p.U
                Vs.append(p.V)
            row, col = row + n, col + r
        V = torch.cat(Vs) if Vs else sparse.new_zeros(0, sparse.shape[1])
        return cls(sparse=sparse, U=U, V=V, info=info, mask=mask)

    def take_rows(self, index: Tensor) -> "CompressedWeight":
        """The same answer with its output rows reordered (row i of the result is row index[i])."""
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return CompressedWeight(dense=pick(self.dense), sparse=pick(self.sparse), U=pick(self.U), V=self.V,
                                info=self.info, mask=pick(self.mask))

    def param_count(self) -> int:
        """Parameters kept: nonzeros of the sparse/dense part plus the low-rank factors' entries."""
        if self.dense is not None:
            return int(torch.count_nonzero(self.dense))
        n = int(torch.count_nonzero(self.sparse))
        if self.U is not None and self.V is not None:
            n += self.U.numel() + self.V.numel()
        return n


class CompressFn(Protocol):
    def __call__(self, weight: Tensor, stats: InputStats | None, budget: Budget, cfg: Any) -> CompressedWeight: ...


Validate = Callable[[Mapping[str, Any]], None]  # raises ConfigError(key, message) for a bad combination


@dataclass(frozen=True)
class Method:
    """A per-weight compression method.

    stats:        what the pipeline must collect for it: 'none', 'diag' or 'gram'.
    keys:         its own config keys (validated and hashed only when this method is selected).
    validate:     cross-key checks on the resolved config (common keys + selected plugins' keys).
    compresses:   False for the reference row ('dense'): no calibration, no compressing pass.
    produces_mask: its answer has a mask a weight update (OPTIMA, block reconstruction) may keep.
    supports_layerwise: a layerwise plugin (OWL) may hand it a per-block sparsity.
    lowrank:      its answers carry a low-rank part, and ``sparsity`` is a compression rate counting it;
                  with N:M the sparse part is fixed and the rank takes the rest of the budget.
    build_module: optional; given (answer, the original nn.Linear, cfg) returns the module to put in the
                  linear's place, or None to write the dense weight back. A method that has one gets
                  compress mode's keys (``compress``, ``forward``); the framework calls it only when
                  ``compress`` is true.
    label:        optional; the name tables give an experiment of this method (cfg -> str).
    workspace:    optional; (d_out, d_in, cfg) -> bytes of the buffers it holds while compressing one
                  [d_out, d_in] matrix, beyond the weight and its statistics (the memory plan, ``oats.plan``).
    """

    name: str
    compress: CompressFn
    stats: str = "diag"
    doc: str = ""
    paper: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)
    validate: Validate | None = None
    compresses: bool = True
    produces_mask: bool = True
    supports_layerwise: bool = True
    lowrank: bool = False
    build_module: Callable[[CompressedWeight, nn.Linear, Any], "nn.Module | None"] | None = None
    label: Callable[[Any], str] | None = None
    workspace: Callable[[int, int, Any], int] | None = None


# stream_dense(stats_kind, on_block, desc): streams the *dense* model over the calibration inputs once,
# calling on_block(i, block, linears, collector, inputs) per block (see oats.pipeline.stream).
StreamDense = Callable[[str, Callable[..., None], str], None]


@dataclass(frozen=True)
class Allocation:
    """A layerwise plugin's answer: one target sparsity per block, and what it measured.

    sparsities: [n_blocks] floats, block i's target sparsity.
    info:       JSON-serialisable facts for the result record (OWL: LOD per block, its hyperparameters).
    """

    sparsities: list[float]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, sparsity: float, n_blocks: int) -> "Allocation":
        return cls([float(sparsity)] * n_blocks)


@dataclass(frozen=True)
class Layerwise:
    """A layerwise plugin (config key ``layerwise``): turns the target sparsity into one sparsity per block.

    allocate(stream_dense, n_blocks, cfg) -> Allocation. It never sees a model, a file or a device:
    ``stream_dense`` runs the dense model for it.
    """

    name: str
    allocate: Callable[[StreamDense, int, Any], Allocation]
    doc: str = ""
    paper: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)
    validate: Validate | None = None
    stats: str = "diag"


@dataclass(frozen=True)
class WeightUpdate:
    """A weight update (config key ``weight_update``) after a method: keeps the method's mask, improves its kept values.

    apply(weight [out, in], answer, stats, cfg) -> CompressedWeight with the same mask.
    supports_factored: it can take a sparse + low-rank answer (re-solving the sparse part, U V fixed).
    workspace: optional; (d_out, d_in, cfg) -> bytes it holds while updating one [d_out, d_in] matrix.
    """

    name: str
    apply: Callable[[Tensor, CompressedWeight, InputStats | None, Any], CompressedWeight]
    stats: str = "gram"
    doc: str = ""
    paper: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)
    validate: Validate | None = None
    supports_factored: bool = True
    workspace: Callable[[int, int, Any], int] | None = None


BLOCK_TARGETS = ("dense_block", "dense_model")  # what a BlockUpdate's targets hold (BlockUpdate.target)


@dataclass(frozen=True)
class BlockUpdate:
    """A block update (config key ``block_update``): an update of a whole block after all its linears are compressed, masks held fixed.

    apply(block, answers {linear name: CompressedWeight}, hidden [batches of [B, L, d]], kwargs_for,
    targets [per batch, [B, L, d]], cfg, device) -> (answers with the same masks, info).
    The block still holds its dense weights when called and must be left so; the framework writes
    the returned answers back.

    target(cfg) says what ``targets`` hold (None: always 'dense_block'): 'dense_block', the dense
    block's outputs on the same (compressed model's) inputs ``hidden``; or 'dense_model', the dense
    model's own activations at the block's output (the framework streams the dense model beside the
    compressed one for it: one more block forward per batch).
    workspace(block_params, hidden, intermediate, cfg), optional: bytes it holds while updating one block.
    window(cfg), optional (None: 1): how many consecutive blocks it fits together. With a window of w
    the blocks are taken in windows [0, w), [w, 2w), ... (the last may be shorter): each block is
    compressed as usual, and at a window's last block ``apply`` gets the window's blocks chained as one
    module (``BlockChain``: its linears named ``<k>.<name>`` for the window's k-th block, every block
    holding its dense weights), their answers, the window's inputs and the targets at the window's
    output; the next block's inputs come from the updated window.
    dense_inputs(cfg), optional: True when ``apply`` also needs the dense model's own inputs of the
    block (or window), passed as the keyword ``dense_hidden`` (one [B, L, d] per batch of ``hidden``).
    check_blocks(cfg, n_blocks), optional: checks needing the model's number of blocks (the preflight
    calls it with the weightless model's before any model loads; raise ConfigError naming the key).
    """

    name: str
    apply: Callable[..., tuple[dict[str, CompressedWeight], dict[str, Any]]]
    doc: str = ""
    paper: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)
    validate: Validate | None = None
    target: Callable[[Any], str] | None = None
    workspace: Callable[[int, int, int, Any], int] | None = None
    window: Callable[[Any], int] | None = None
    dense_inputs: Callable[[Any], bool] | None = None
    check_blocks: Callable[[Any, int], None] | None = None


@dataclass
class DenseTargets:
    """What the dense model predicts on the calibration windows, recorded before anything is compressed.

    ids:      [n, L] int64 token ids of the calibration windows.
    logprobs: [n, L, k] float32, the dense model's k largest next-token log-probabilities at every position.
    index:    [n, L, k] int64, their token ids.
    The remaining mass, ``1 - exp(logprobs).sum(-1)``, is the probability of every other token together.
    """

    ids: Tensor
    logprobs: Tensor
    index: Tensor

    @property
    def topk(self) -> int:
        return int(self.logprobs.shape[-1])

    def windows(self, rows: Tensor | list[int]) -> "DenseTargets":
        """The targets of the windows ``rows`` only."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return DenseTargets(self.ids[rows], self.logprobs[rows], self.index[rows])


LogitsFn = Callable[[Tensor], Tensor]  # token ids [B, L] -> next-token logits [B, L, vocab]


class UpdateStore(Protocol):
    """Where a resumable model update keeps its state between epochs (the framework decides where).

    save(state): replace the saved state, atomically; ``state`` holds tensors and plain values only.
    load() -> the state saved last (tensors on the CPU), or None when there is none.
    """

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class ModelUpdate:
    """A model update (config key ``model_update``): an end-to-end update of the whole compressed model,
    after every block is compressed, that keeps every mask and the parameter budget.

    apply(model, layers {name: SparseLowRankLinear}, targets: DenseTargets, logits_of, cfg, device) -> info.
    ``logits_of(ids [B, L]) -> [B, L, vocab]`` runs the model (differentiably). The model is in memory on ``device``, every compressed linear held as a ``factored.module.SparseLowRankLinear``
    (whether or not ``compress`` is set: the framework merges them back into dense weights afterwards when
    it is not); ``targets`` are the dense model's top-k next-token distributions on the calibration
    windows, ``topk(cfg)`` wide. It updates the model in place and returns JSON-serialisable facts for
    the record (the loss curve). The framework then checks that every layer's mask is bit for bit the one
    given and its rank the same (and its sparse values, unless ``trains_sparse``), and counts the kept
    parameters again.
    needs_lowrank: it trains the low-rank factors, so the method's answers must have them (``Method.lowrank``).
    trains_sparse: it trains the sparse values on their masks; the framework then also holds a method's
    pruned (dense-answer) linears as rank-0 factored layers, so every method can be selected.
    workspace(model_params, trained_params, cfg), optional: bytes it holds beyond the model and the targets.
    resumable: ``apply`` also takes ``store=`` (an :class:`UpdateStore`, or None when the run keeps no
    checkpoint); it saves its state there after every epoch and, when ``store.load()`` gives one, goes on
    from it, ending where an uninterrupted run ends.
    """

    name: str
    apply: Callable[..., dict[str, Any]]
    topk: Callable[[Any], int]
    doc: str = ""
    paper: str = ""
    keys: Mapping[str, Key] = field(default_factory=dict)
    validate: Validate | None = None
    needs_lowrank: bool = True
    workspace: Callable[[int, int, Any], int] | None = None
    trains_sparse: bool = False
    resumable: bool = False


class BlockChain(nn.ModuleList):
    """Consecutive blocks run as one: ``forward(h, **kwargs)`` passes ``h`` through each block in turn
    with the same keyword arguments (an output tuple's [0] goes on) and returns the last hidden states."""

    def forward(self, hidden: Tensor, **kwargs: Any) -> Tensor:
        for block in self:
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return hidden

"""Compress mode: a linear layer stored as a sparse part plus a low-rank pair, and saving/loading a
model that holds such layers.

``SparseLowRankLinear`` computes ``y = x S^T + (x V^T) U^T (+ b)``. S is held in the bitmask layout of
:mod:`factored.bitmask`: its nonzeros row-major (``values`` [nnz]) and one bit per entry (``mask`` uint8
[d_out, 4 * ceil(d_in / 32)]), never as a dense tensor or with per-nonzero indices, so the state dict,
``safetensors`` files, checkpoints and memory hold ``nnz * e + d_out * d_in / 8`` bytes for S (bfloat16 at
50%: 0.5625 of dense). A state dict or saved folder holding S in the older CSR form (``crow_indices``,
``col_indices``) also loads, in memory and through the loaders that read tensors by name (:func:`read_tensors`).

Saving (:func:`save_compressed`) writes the model with ``save_pretrained`` plus a manifest
``oats_compressed.json`` naming every factored layer and its shapes; :func:`load_compressed`
rebuilds the architecture from ``config.json``, swaps those layers in, and loads the tensors.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factored import bitmask as bm

MANIFEST = "oats_compressed.json"


def csr_masks(names: Iterable[str], stored: Container[str]) -> dict[str, tuple[str, str]]:
    """``{PREFIX.mask: (PREFIX.crow_indices, PREFIX.col_indices)}`` for each SparseLowRankLinear mask among
    ``names`` that ``stored`` (a state dict, a checkpoint's tensor names) lacks but holds in the older CSR form."""
    out = {}
    for n in names:
        if n.endswith("mask") and (n == "mask" or n.endswith(".mask")) and n not in stored:
            prefix = n[: -len("mask")]
            crow, col = prefix + "crow_indices", prefix + "col_indices"
            if crow in stored and col in stored:
                out[n] = (crow, col)
    return out


def read_tensors(names: Sequence[str], stored: Container[str], read: Callable[[list[str]], dict[str, Tensor]],
                 mask_shape: Callable[[str], tuple[int, int]]) -> dict[str, Tensor]:
    """``read(names)``, except that a mask saved in the older CSR form (:func:`csr_masks`) is read as its two
    index tensors and converted (``mask_shape(name)``: the mask's shape, e.g. from a meta skeleton). The
    loaders that look tensors up by name (lazy blocks, placed evaluation) read through this."""
    csr = csr_masks(names, stored)
    got = read([n for n in names if n not in csr] + [t for pair in csr.values() for t in pair])
    for name, (crow, col) in csr.items():
        got[name] = bm.mask_from_csr(got.pop(crow), got.pop(col), tuple(mask_shape(name)))
    return got


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class SparseLowRankLinear(nn.Module):
    """y = x S^T + (x V^T) U^T + bias. S [out, in] as values + bitmask, U [out, r], V [r, in]."""

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = dict(dtype=dtype, device=device)
        self.values = nn.Parameter(torch.zeros(nnz, **kw))
        self.register_buffer("mask", torch.zeros(out_features, bm.mask_bytes(in_features), dtype=torch.uint8, device=device))
        self.U = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.V = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, sparse: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "SparseLowRankLinear":
        """Build from a dense-shaped ``sparse`` [out, in] (exact zeros are dropped), U [out, r], V [r, in]."""
        dtype = dtype or sparse.dtype
        d_out, d_in = sparse.shape
        values, mask = bm.pack(sparse.detach())
        mod = cls(d_in, d_out, U.shape[1], int(values.numel()), bias is not None, dtype, sparse.device)
        with torch.no_grad():
            mod.values.copy_(values.to(dtype))
            mod.mask.copy_(mask)
            mod.U.copy_(U.to(dtype))
            mod.V.copy_(V.to(dtype))
            if bias is not None:
                mod.bias.copy_(bias.to(dtype))
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, (crow, col) in csr_masks([prefix + "mask"], state_dict).items():  # S saved in CSR form
            state_dict[name] = bm.mask_from_csr(state_dict.pop(crow), state_dict.pop(col), tuple(self.mask.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def row_offsets(self) -> Tensor:
        """Where each row's values start: int64 [out + 1], recomputed from the mask when it changes."""
        return self._mask_derived("_oats_offsets", bm.row_offsets)

    def two_four_rows(self) -> Tensor | None:
        """The rows holding exactly 2 entries in every 4 columns (:func:`factored.bitmask.two_per_nibble`)
        as uint8 [out], which the compiled kernel reads by its 2:4 path; None when no row does. Computed
        from the mask once (again when it changes)."""
        return self._mask_derived("_oats_two_four", lambda mask: bm.two_four_flags(mask, self.in_features))

    def _mask_derived(self, name: str, fn):
        mask = self._buffers["mask"]  # (not through nn.Module.__getattr__: this runs on every decode call)
        key = (mask.data_ptr(), mask._version)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, fn(mask))
            self.__dict__[name] = cached
        return cached[1]

    def sparse_dense(self) -> Tensor:
        """S as a fresh dense [out, in] tensor (differentiable in ``values`` when grad is enabled)."""
        if not (torch.is_grad_enabled() and self.values.requires_grad):
            from factored.kernels import bitmask_to_dense

            W = bitmask_to_dense(self.values, self.row_offsets(), self.mask, self.in_features)
            if W is not None:
                return W
        return bm.to_dense(self.values, self.mask, self.in_features)

    def sparse_weight(self) -> Tensor:
        """S as a torch CSR tensor [out, in] (indices built from the mask; values shared)."""
        crow, col = bm.to_csr_indices(self.mask, self.in_features)
        with warnings.catch_warnings():  # 'sparse CSR support is in beta'
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, self.values, (self.out_features, self.in_features), check_invariants=False)

    def merged_weight(self) -> Tensor:
        """W = S + U V as a fresh dense [out, in] tensor in the layer's dtype, the product summed in float32."""
        with torch.no_grad():
            S = self.sparse_dense()
            return (S.float() + self.U.float() @ self.V.float()).to(S.dtype) if self.rank else S

    def dense_weight(self) -> Tensor:
        """S + U V as a dense [out, in] tensor (for checks)."""
        return self.sparse_dense() + self.U @ self.V

    def param_count(self) -> int:
        """Nonzeros of S plus the entries of U and V (the bias is not counted, as for dense layers)."""
        return self.nnz + self.U.numel() + self.V.numel()

    def forward(self, x: Tensor) -> Tensor:
        """S densified per call (no copy kept; differentiable), then ``F.linear``, plus the low-rank part.
        The fast forwards are :mod:`factored.forward`'s."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = F.linear(x2, self.sparse_dense()) + (x2 @ self.V.T) @ self.U.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, nnz={self.nnz}, bias={self.bias is not None}"


def compressed_layers(model: nn.Module) -> dict[str, SparseLowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)}


def write_manifest(model: nn.Module, directory: str | Path) -> Path | None:
    """Write :data:`MANIFEST` (every SparseLowRankLinear's name and shapes) into ``directory`` when the
    model holds such layers; the module structure is all it reads, so a meta-device skeleton will do."""
    from data.files import atomic_write_text

    layers = compressed_layers(model)
    if not layers:
        return None
    manifest = {"format": "oats-sparse-lowrank-v2", "layers": {
        n: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank, "nnz": m.nnz,
            "bias": m.bias is not None} for n, m in layers.items()}}
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=1))
    return Path(directory) / MANIFEST


def apply_manifest(model: nn.Module, directory: str | Path, dtype: torch.dtype, device: str | torch.device | None = None) -> int:
    """Swap the layers a saved model's :data:`MANIFEST` names for empty SparseLowRankLinear modules
    (on ``device``; 'meta' for a lazily loaded skeleton). Returns how many; 0 without a manifest."""

    path = Path(directory) / MANIFEST
    if not path.is_file():
        return 0
    layers = json.loads(path.read_text())["layers"]
    for name, spec in layers.items():
        set_module(model, name, SparseLowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["nnz"],
                                                    spec["bias"], dtype=dtype, device=device))
    return len(layers)


def save_compressed(model: nn.Module, directory: str | Path, **save_kwargs: Any) -> Path:
    """``model.save_pretrained(directory)`` plus, when the model holds SparseLowRankLinear layers, the
    manifest :data:`MANIFEST` that :func:`load_compressed` needs. Works for uncompressed models too."""
    directory = Path(directory)
    model.save_pretrained(directory, **save_kwargs)
    write_manifest(model, directory)
    return directory


def _read_state_dict(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        out: dict[str, Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    out = {}
    for f in files:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def load_compressed(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_compressed`: the architecture from its config, the factored
    layers swapped in per the manifest, every tensor from the saved weights (strictly: a missing or
    unexpected tensor is an error, except weights tied to others). Eval mode, on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        return model.eval()
    config = AutoConfig.from_pretrained(directory)
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or saved or torch.float32)
    layer_dtype = next(model.parameters()).dtype
    apply_manifest(model, directory, layer_dtype)
    state = _read_state_dict(directory)
    missing, unexpected = model.load_state_dict({k: v.to(layer_dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        model.tie_weights()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{directory}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    return model.eval()

"""Where a model's weights come from: the model in memory, or its safetensors shards read lazily
(models bigger than memory). The experiment lifecycle (``oats.experiment``) runs the same code over
either; the lazy source only adds the loading and freeing around each block.

Lazy: compress block by block with weights read from safetensors shards only when needed.

The model is built on the meta device (accelerate ``init_empty_weights``: parameters take no memory,
buffers such as rotary frequencies stay real). Weights are read with ``safetensors.safe_open`` only
when needed and freed (put back on the meta device) right after:

- embeddings / final norm / LM head ("the head"): loaded to catch block 0's calibration inputs, freed,
  loaded again for the evaluation's head;
- block i: loaded just before it is calibrated and compressed, written to its own output shard
  ``<out>/<name>/model/model-block-00007.safetensors``, freed.

Each shard file is opened for one block and closed again, so the memory map never keeps more than
that block's pages resident. Peak memory is then about max(rest, one block + its statistics) plus the
calibration activations (two copies: a block's inputs and its outputs), whatever the model's size.

The output directory is a normal sharded Hugging Face checkpoint (``model.safetensors.index.json``,
``config.json``, tokenizer) that ``from_pretrained`` loads (in compress mode with the manifest that
``factored.module.load_compressed`` reads). Token perplexity streams the compressed shards
block by block the same way; evaluations that need the whole model at once (lm_eval's zero-shot
tasks and word perplexity) load the compressed model from those shards.
"""
from __future__ import annotations

import json
import shutil
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from data.files import torch_dtype
from oats.architectures import blocks_path, get_blocks
from oats.pipeline import Resident

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
REST_SHARD = "model-rest.safetensors"


class InMemoryWeights(Resident):
    """The whole model in memory: loading and freeing are no-ops."""

    lazy = False

    def __init__(self, model: nn.Module):
        self.model = model


def block_shard(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


class ShardedWeights:
    """Where each tensor of a safetensors checkpoint directory lives (one file, or an index of shards).

    Nothing is read until :meth:`load`, which opens each needed file once and closes it afterwards.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.file_of: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory}: no *.safetensors files (lazy_load reads safetensors checkpoints only)")
            from safetensors import safe_open

            self.file_of = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.file_of.update({k: f.name for k in h.keys()})

    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The named tensors, read from their shards (each file opened once), cast to ``dtype``."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.file_of:
                raise KeyError(f"{self.directory}: tensor {n!r} is in no shard")
            by_file.setdefault(self.file_of[n], []).append(n)
        out: dict[str, Tensor] = {}
        for fname, keys in by_file.items():
            with safe_open(str(self.directory / fname), framework="pt", device=str(device)) as h:
                for k in keys:
                    t = h.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def empty_model(model_dir: str | Path, dtype: str = "float32") -> nn.Module:
    """The model of ``model_dir/config.json`` with every parameter on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from factored.module import apply_manifest

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
        apply_manifest(model, Path(model_dir), torch_dtype(dtype), device="meta")  # compress-mode layers, if any
    model.eval()
    model.config.use_cache = False
    return model


def _persistent_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name, as the checkpoint holds them (shared ones once)."""
    return dict(module.state_dict(keep_vars=True))


def _to_meta(module: nn.Module) -> None:
    """Free ``module``'s parameters and persistent buffers (non-persistent buffers, such as rotary
    frequencies computed at construction, are kept: no checkpoint holds them)."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for n, b in list(m._buffers.items()):
            if b is not None and n not in m._non_persistent_buffers_set and b.device.type != "meta":
                m._buffers[n] = torch.empty_like(b, device="meta")


def pin_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation above ``nbytes`` by mmap (returned to the OS on free).

    glibc raises its mmap threshold after each large free (up to 32 MiB), so block-sized tensors
    that are loaded, compressed and freed one after another end up on the heap and fragment it: the
    resident size then grows by about a block per block. Fixing the threshold (``mallopt``) stops the
    growth; measured in bench/bench_memory.py. Returns False where there is no glibc (no-op).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class LazyModel:
    """A meta-device model plus the shards its weights come from; loads and frees pieces on demand."""

    lazy = True

    def __init__(self, model: nn.Module, source: ShardedWeights, dtype: str = "float32"):
        pin_malloc_mmap_threshold()
        self.model, self.source, self.dtype = model, source, torch_dtype(dtype)
        self.prefix = blocks_path(model)
        self.n_blocks = len(get_blocks(model))
        blocks = get_blocks(model)
        blocks_ids = {id(p) for p in blocks.parameters()}
        self.head_names = [n for n, t in _persistent_tensors(model).items() if not n.startswith(self.prefix + ".") and id(t) not in blocks_ids]
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: str = "float32") -> "LazyModel":
        return cls(empty_model(model_dir, dtype), ShardedWeights(model_dir), dtype)

    def _assign(self, root: nn.Module, tensors: dict[str, Tensor]) -> None:
        missing, unexpected = root.load_state_dict(tensors, strict=False, assign=True)
        if unexpected:
            raise RuntimeError(f"unexpected tensors {unexpected[:5]}")
        return missing

    def load_head(self) -> None:
        """Load everything but the blocks (embeddings, final norm, LM head)."""
        names = [n for n in self.head_names if n in self.source.file_of]
        absent = [n for n in self.head_names if n not in self.source.file_of]
        if absent and not (self.tied and all(n.endswith("lm_head.weight") for n in absent)):
            raise KeyError(f"{self.source.directory}: tensors {absent[:5]} are in no shard")
        tensors = self.source.load(names, self.dtype)
        self.model.load_state_dict(tensors, strict=False, assign=True)
        if self.tied:
            out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
            if out is not None and inp is not None:
                out.weight = inp.weight

    def free_head(self) -> None:
        blocks = get_blocks(self.model)
        saved = list(blocks)
        for k in range(len(blocks)):
            blocks[k] = nn.Identity()
        try:
            _to_meta(self.model)
        finally:
            for k, b in enumerate(saved):
                blocks[k] = b

    def load_block(self, i: int) -> None:
        """Read block ``i``'s weights from the shards into the skeleton (CPU, the configured dtype)."""
        from factored.module import read_tensors

        block = get_blocks(self.model)[i]
        skeleton = _persistent_tensors(block)
        pre = f"{self.prefix}.{i}."
        tensors = read_tensors([pre + n for n in skeleton], self.source.file_of, lambda names: self.source.load(names, self.dtype),
                               lambda n: skeleton[n[len(pre):]].shape)
        block.load_state_dict({n[len(pre):]: t for n, t in tensors.items()}, strict=True, assign=True)

    def free_block(self, i: int) -> None:
        _to_meta(get_blocks(self.model)[i])


class ShardWriter:
    """Writes a compressed model shard by shard: one file per block, one for the rest, then the index."""

    def __init__(self, out_dir: Path, lazy: LazyModel):
        self.dir, self.lazy = Path(out_dir), lazy
        self.dir.mkdir(parents=True, exist_ok=True)

    def write_block(self, i: int, block: nn.Module) -> None:
        from safetensors.torch import save_file

        tensors = {f"{self.lazy.prefix}.{i}.{n}": t.detach().to("cpu").contiguous() for n, t in block.state_dict().items()}
        tmp = self.dir / f".{block_shard(i)}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.dir / block_shard(i))

    def write_rest_and_index(self, model_dir: Path, tokenizer: Any = None) -> None:
        """Copy the uncompressed head from the source, then the index, config, manifest and tokenizer."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        names = [n for n in self.lazy.head_names if n in self.lazy.source.file_of]
        save_file({k: v.contiguous() for k, v in self.lazy.source.load(names, self.lazy.dtype).items()}, str(self.dir / REST_SHARD), metadata={"format": "pt"})
        weight_map = {n: REST_SHARD for n in names}
        total = 0
        for i in range(self.lazy.n_blocks):
            path = self.dir / block_shard(i)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: block {i} was never written")
            with safe_open(str(path), framework="pt") as h:
                for k in h.keys():
                    weight_map[k] = path.name
            total += path.stat().st_size
        total += (self.dir / REST_SHARD).stat().st_size
        (self.dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        self.lazy.model.config.save_pretrained(self.dir)
        from factored.module import write_manifest

        write_manifest(self.lazy.model, self.dir)
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, self.dir / gen.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)


def local_model_dir(name: str) -> Path:
    """A local directory holding ``name``'s config and safetensors (embedded, local, or a hub snapshot)."""
    from oats.models import model_path

    path = Path(model_path(name)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))

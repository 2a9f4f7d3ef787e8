"""The memory plan of an experiment, before anything loads (``python main.py --plan``).

The model is built from its ``config.json`` on the meta device (no weights), and its shapes give each
phase's bytes; one block is run on meta tensors to see which linear layers read the same input (they
share their statistics, as ``oats.pipeline.StatsCollector`` shares them). Per experiment:

- ``weights``: the whole model in memory; with ``lazy_load`` the head (embeddings, final norm, LM
  head) plus one block (the next block is read after the last one is freed);
- ``generation``: with ``self_generated`` calibration text, sampling it from the whole dense model on
  ``device``: one batch's KV cache, logits and MLP activations (the weights are counted already);
- ``activations``: the calibration hidden states, a block's inputs and its outputs (two copies), plus a
  third with a block update that matches the dense model's own activations;
- ``block_forward``: the transient of one block's forward on one calibration batch (q, k, v, attention
  scores for eager attention, the MLP's intermediate activations);
- ``statistics``: one accumulator per distinct input of a block, its diagonal (``diag``) or Gram matrix
  (``gram``) in ``stats_dtype``;
- ``decomposition``: the largest per-matrix buffer: the framework's copies (the weight in float32, the
  answer, the float64 error report) plus what the method and the weight update declare
  (``Method.workspace`` / ``WeightUpdate.workspace``, bytes for one [d_out, d_in] matrix), and a block
  update's own (``BlockUpdate.workspace``, bytes for one block);
- ``evaluation``: the logits of one evaluation batch (float32, with the log-softmax and the shifted copy
  of the NLL) and, streamed under ``lazy_load``, the evaluation windows' hidden states; the weights an
  lm_eval evaluation (or, with ``device_map``, every evaluation) holds when the saved model is loaded
  placed under ``lazy_load``: the head and two blocks, or what ``max_memory`` gives the CPU.

The CPU peak is ``floor + weights + max(compression, evaluation)``, where ``floor`` is the interpreter
with torch, transformers, the tokenizer and the data loaded (``FLOOR_BYTES``, measured; see
docs/scale.md). On a GPU (``device: cuda``) the weights stay on the CPU and one block at a time moves to
the device with its activations, statistics and buffers; evaluation puts the whole model there. With
``stats_device`` the activations and statistics are counted where they live (the CPU, or another GPU)
and the compute device keeps one layer's statistics served for its solve. With ``device_map`` the
evaluation's weights are counted on the devices accelerate's map of the weightless model gives them
(``oats.placement.device_map_for``, the map the run itself uses), the evaluation's activations and one
offloaded block on the map's main device.
Zero-shot and MMLU (lm_eval) are planned as one evaluation batch of ``zero_shot_batch_size`` windows of
the model's longest request, which lm_eval caps at ``ZERO_SHOT_CONTEXT`` tokens here.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence
from unittest import mock

import torch
from torch import nn

from data.files import torch_dtype

FLOOR_BYTES = 420 * 2**20  # measured: python + torch + transformers + tokenizer + calibration text, no weights (docs/scale.md)
ZERO_SHOT_CONTEXT = 512
FRAMEWORK_BYTES_PER_ELEMENT = 44  # weight f32 clone, answer f32, to_dense f32, the error report's float64 copies (4 + 4 + 4 + 32)
GIB = 2**30


@dataclass(frozen=True)
class Linear:
    name: str
    d_out: int
    d_in: int


@dataclass(frozen=True)
class Shapes:
    """What the plan needs of a model, read off its weightless skeleton.

    inputs: the linear layers of one block grouped by the input they read (layers in one group share it).
    """

    n_blocks: int
    block_params: int
    head_params: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    inputs: tuple[tuple[Linear, ...], ...]
    eager_attention: bool

    @property
    def linears(self) -> list[Linear]:
        return [lin for group in self.inputs for lin in group]


def model_config(name: str) -> Any:
    """The model's ``PretrainedConfig`` without its weights: a local directory's ``config.json``, the
    embedded model's converted copy (or its GGUF header when not converted yet), or the hub's."""
    from transformers import AutoConfig

    from oats.models import EMBEDDED, embedded_gguf

    if name in EMBEDDED:
        from data.files import cache_dir

        converted = cache_dir(EMBEDDED[name][2])
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        directory, fname = embedded_gguf(name)
        return AutoConfig.from_pretrained(directory, gguf_file=fname)
    return AutoConfig.from_pretrained(name)


def skeleton(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the meta device (parameters take no memory; buffers such as rotary frequencies stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one tensor, as once loaded (accelerate's map and sizes count it once)
    return model.eval()


def _input_groups(model: nn.Module, layers: Mapping[str, nn.Linear]) -> tuple[tuple[str, ...], ...]:
    """Linear layers of block 0 grouped by the tensor they read, from one forward on meta tensors;
    each layer alone when the meta forward fails (an over-estimate of the statistics, never under)."""
    from oats.architectures import architecture_of, get_blocks

    class _Ran(Exception):
        pass

    seen: list[tuple[str, Any]] = []

    def run_block_0(module: nn.Module, args: tuple, kwargs: dict) -> None:
        module.forward(*args, **kwargs)  # the linears' hooks see their inputs
        raise _Ran

    hooks = [lin.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, inp[0]))) for n, lin in layers.items()]
    try:
        arch = architecture_of(model)
        if arch.modality != "text":
            raise NotImplementedError
        hooks.append(get_blocks(model)[0].register_forward_pre_hook(run_block_0, with_kwargs=True))
        # the causal-mask helper reads a value (packed sequences) that meta tensors do not have; it does
        # not change which layers read the same input
        import transformers.masking_utils as masking

        quiet = (mock.patch.object(masking, "find_packed_sequence_indices", lambda *a, **k: None)
                 if hasattr(masking, "find_packed_sequence_indices") else contextlib.nullcontext())
        try:
            with quiet:
                model(**arch.inputs(torch.zeros(1, 8, dtype=torch.long, device="meta")))
        except _Ran:
            pass
        groups: dict[int, list[str]] = {}
        for n, x in seen:
            groups.setdefault(id(x), []).append(n)
        if sorted(n for g in groups.values() for n in g) != sorted(layers):
            raise RuntimeError("not every linear ran")
        return tuple(tuple(g) for g in groups.values())
    except Exception:
        return tuple((n,) for n in layers)
    finally:
        for h in hooks:
            h.remove()


@lru_cache(maxsize=8)
def weightless_model(name: str, dtype: str = "float32") -> nn.Module:
    """Model ``name`` built from its config on the meta device in ``dtype``, once per name and dtype:
    the plan and the preflight's architecture checks read it; nothing loads."""
    return skeleton(model_config(name), torch_dtype(dtype))


@lru_cache(maxsize=16)
def shapes_of(name: str) -> Shapes:
    """The plan's view of model ``name`` (config only, nothing loaded)."""
    from oats.architectures import get_blocks, linear_layers

    model = weightless_model(name)
    config = model.config
    blocks = get_blocks(model)
    block = blocks[0]
    layers = linear_layers(block)
    groups = _input_groups(model, layers)
    inputs = tuple(tuple(Linear(n, layers[n].out_features, layers[n].in_features) for n in g) for g in groups)
    block_params = sum(p.numel() for p in block.parameters())
    in_blocks = {id(p) for p in blocks.parameters()}
    head_params = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None and in_emb is not None and out_emb.weight is not in_emb.weight:
        head_params -= out_emb.weight.numel()  # one tensor once loaded (the skeleton may not tie them)
    heads = int(getattr(config, "num_attention_heads", 1))
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    return Shapes(
        n_blocks=len(blocks), block_params=block_params, head_params=head_params, hidden=int(config.hidden_size),
        vocab=int(getattr(config, "vocab_size", 0)), heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)), inputs=inputs,
        eager_attention=impl == "eager")


@dataclass
class MemoryPlan:
    """Peak bytes of one experiment, by part and by device."""

    name: str
    device: str
    parts: dict[str, int] = field(default_factory=dict)
    cpu_peak: int = 0
    device_peak: int = 0  # the compute device's (0 on a CPU run)
    other_gpus: dict[str, int] = field(default_factory=dict)  # peaks of the other GPUs (stats_device, device_map)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "parts": dict(self.parts), "cpu_peak": self.cpu_peak,
                "device_peak": self.device_peak, "other_gpus": dict(self.other_gpus), "notes": list(self.notes)}


def _workspace(plugin: Any, d_out: int, d_in: int, cfg: Any) -> int:
    fn = getattr(plugin, "workspace", None)
    return int(fn(d_out, d_in, cfg)) if fn is not None else 0


def plan_experiment(cfg: Any, shapes: Shapes | None = None) -> MemoryPlan:
    """The memory plan of one resolved experiment (see the module docstring for each part)."""
    from oats.compressor import stats_kind_for
    from oats.config import selected_plugins

    s = shapes if shapes is not None else shapes_of(cfg.model)
    plugins = selected_plugins(cfg)
    method = plugins["method"]
    E = A = torch_dtype(cfg.dtype).itemsize  # weights and activations
    S = torch_dtype(cfg.stats_dtype).itemsize
    block_bytes = s.block_params * E
    head_bytes = s.head_params * E
    whole = s.n_blocks * block_bytes + head_bytes
    on_gpu = str(cfg.device).startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    p = MemoryPlan(cfg.name, "cuda" if on_gpu else "cpu")
    p.parts["weights"] = head_bytes + block_bytes if cfg.lazy_load else whole

    compression = 0
    if method.compresses:
        n, L, b = int(cfg.cal_nsamples), int(cfg.cal_seqlen), int(cfg.cal_batch_size)
        block_update = plugins.get("block_update")
        dense_stream = block_update is not None and (
            (block_update.target is not None and block_update.target(cfg) == "dense_model")
            or (block_update.dense_inputs is not None and bool(block_update.dense_inputs(cfg))))
        windowed = block_update is not None and block_update.window is not None and int(block_update.window(cfg)) > 1
        # + the dense model's stream; + a window's inputs, its dense outputs and the dense model's inputs of its first block
        copies = 2 + dense_stream + (windowed * (2 + dense_stream))
        p.parts["activations"] = copies * n * L * s.hidden * A
        qkv = b * L * (s.heads + 2 * s.kv_heads) * s.head_dim * A
        scores = b * s.heads * L * L * 4 * 2 if s.eager_attention else b * s.heads * L * 4
        p.parts["block_forward"] = qkv + scores + 3 * b * L * s.intermediate * A + 2 * b * L * s.hidden * A
        kind = stats_kind_for(cfg)
        p.parts["statistics"] = sum(g[0].d_in * (g[0].d_in if kind == "gram" else 1) * S for g in s.inputs) if kind != "none" else 0
        update = plugins.get("weight_update")
        per_matrix = max(FRAMEWORK_BYTES_PER_ELEMENT * lin.d_out * lin.d_in + _workspace(method, lin.d_out, lin.d_in, cfg)
                         + (_workspace(update, lin.d_out, lin.d_in, cfg) if update is not None else 0) for lin in s.linears)
        p.parts["decomposition"] = per_matrix
        if block_update is not None:
            fn = getattr(block_update, "workspace", None)
            p.parts["block_update"] = int(fn(s.block_params, s.hidden, s.intermediate, cfg)) if fn is not None else 4 * s.block_params * 4
        compression = sum(p.parts.get(k, 0) for k in ("activations", "block_forward", "statistics", "decomposition", "block_update"))
        if cfg.lazy_load:
            compression += block_bytes  # the compressed block written to its shard while the next is read

    model_update = plugins.get("model_update")
    if method.compresses and model_update is not None:
        # the dense model's top-k targets, on the CPU from calibration to the update; the update trains the whole
        # model: the dense S of every layer kept for the backward, one window's activations and logits, its workspace
        n, L = int(cfg.cal_nsamples), int(cfg.cal_seqlen)
        p.parts["dense_targets"] = n * L * min(int(model_update.topk(cfg)), s.vocab) * 12
        linear_params = s.n_blocks * sum(lin.d_out * lin.d_in for lin in s.linears)
        trained = int((1.0 - float(cfg.sparsity)) * linear_params)  # the low-rank part lies inside the kept budget
        ws = model_update.workspace(s.n_blocks * s.block_params + s.head_params, trained, cfg) if model_update.workspace else 16 * trained
        p.parts["model_update"] = (linear_params * E + L * s.n_blocks * (10 * s.hidden + 4 * s.intermediate) * 4
                                   + 3 * L * s.vocab * 4 + int(ws))

    from oats.config import cal_sources, update_sources, uses_self_generated

    if method.compresses and uses_self_generated(cfg):  # sampled from the whole dense model on `device`, KV cache and logits
        n_gen = max(dict(cal_sources(cfg)).get("self_generated", 0), dict(update_sources(cfg)).get("self_generated", 0))
        b_gen, L_gen = min(int(cfg.cal_batch_size), max(n_gen, 1)), int(cfg.cal_seqlen)
        p.parts["generation"] = (b_gen * L_gen * s.n_blocks * 2 * s.kv_heads * s.head_dim * A + 2 * b_gen * s.vocab * 4
                                 + b_gen * L_gen * s.intermediate * A)
    be, Le = int(cfg.eval_batch_size), int(cfg.eval_seqlen)
    evaluation = 0
    if cfg.get("eval_datasets"):
        evaluation = 3 * be * Le * s.vocab * 4 + 3 * be * Le * s.intermediate * A
        if cfg.lazy_load:
            windows = int(cfg.eval_max_windows) if cfg.eval_max_windows else 0
            if windows:
                evaluation += 2 * windows * Le * s.hidden * A
            else:
                p.notes.append("lazy_load with eval_max_windows None: the streamed hidden states grow with the test split (not planned)")
    if cfg.get("zero_shot_tasks") or cfg.get("word_perplexity"):
        bz = int(cfg.get("zero_shot_batch_size") or 1)
        evaluation = max(evaluation, 3 * bz * ZERO_SHOT_CONTEXT * s.vocab * 4)
        if cfg.lazy_load and not cfg.get("device_map"):  # lm_eval gets the saved model placed: the head and two blocks (oats.tasks)
            p.parts["weights_lm_eval"] = head_bytes + 2 * block_bytes
    placed = _placed_bytes(cfg, s) if cfg.get("device_map") else None
    if cfg.get("device_map"):  # every metric on the placed model
        if cfg.lazy_load:  # loaded placed: in memory what the map (else max_memory) gives the CPU and a block being read, the rest on disk
            budget = placed.get("cpu", 0) if placed is not None else _cpu_budget(cfg)
            p.parts["weights_lm_eval"] = whole if budget is None else min(whole, budget + block_bytes)
            evaluation -= 2 * int(cfg.eval_max_windows or 0) * Le * s.hidden * A if cfg.get("eval_datasets") else 0  # not streamed
        else:
            p.notes.append("device_map on a model in memory: it is whole in memory before it is placed")
    p.parts["evaluation"] = evaluation
    p.parts["floor"] = FLOOR_BYTES
    generation = p.parts.get("generation", 0)
    compute = "cuda:0" if on_gpu else "cpu"
    home = _gpu_name(cfg.get("stats_device") or compute)
    kept_apart = 0  # compression bytes that live on stats_device instead of the compute device
    if method.compresses and home != compute:
        largest = max(g[0].d_in * (g[0].d_in if kind == "gram" else 1) * S for g in s.inputs) if kind != "none" else 0
        kept_apart = p.parts["activations"] + p.parts["statistics"]
        compression += largest - kept_apart  # one layer's statistics served on the compute device for its solve
        if home != "cpu":
            p.other_gpus[home] = kept_apart
    cpu_apart = kept_apart if home == "cpu" else 0
    gpus = {d: b for d, b in (placed or {}).items() if d.startswith("cuda")}
    main = next(iter(gpus), None)

    def placed_peak(d: str) -> int:  # a GPU's weights, and on the main one the activations and an offloaded block
        return gpus.get(d, 0) + (evaluation + block_bytes if d == main else 0)

    for d in gpus:
        if d != compute:
            p.other_gpus[d] = max(p.other_gpus.get(d, 0), placed_peak(d))
    if on_gpu:  # in memory, evaluation moves the whole model to the device; lazily, one block at a time
        eval_peak = placed_peak(compute) if gpus else (block_bytes if cfg.lazy_load else whole) + evaluation
        update = whole + p.parts["model_update"] if p.parts.get("model_update") else 0
        p.device_peak = max(block_bytes + compression, eval_peak, whole + generation if generation else 0, update)
        p.cpu_peak = FLOOR_BYTES + p.parts["weights"] + p.parts.get("weights_lm_eval", 0) + cpu_apart + p.parts.get("dense_targets", 0)
    else:
        p.cpu_peak = FLOOR_BYTES + p.parts["weights"] + p.parts.get("dense_targets", 0) + max(
            compression + cpu_apart, evaluation + p.parts.get("weights_lm_eval", 0), generation, p.parts.get("model_update", 0))
    return p


def _gpu_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _placed_bytes(cfg: Any, s: Shapes) -> dict[str, int] | None:
    """Weight bytes per device of the evaluation placed by ``device_map`` ({'cuda:N' | 'cpu' | 'disk':
    bytes}, in the map's order, so its main device is the first GPU): accelerate's map of the weightless
    model in ``dtype`` (what the run computes on the real one). Without a readable config (a plan from
    shapes alone), the GPUs ``max_memory`` names share the model evenly; None when none is named."""
    from oats.placement import device_map_for

    try:
        model = weightless_model(cfg.model, cfg.dtype)
    except Exception:
        model = None
    if model is None:
        gpus = [d for d in dict(cfg.get("max_memory") or {}) if d.startswith("cuda")]
        if not gpus:
            return None
        whole = (s.n_blocks * s.block_params + s.head_params) * torch_dtype(cfg.dtype).itemsize
        return {d: -(-whole // len(gpus)) for d in gpus}
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=torch_dtype(cfg.dtype))
    out: dict[str, int] = {}
    for module, device in device_map_for(model, cfg).items():
        out[device] = out.get(device, 0) + int(sizes.get(module, 0))
    return out


def _cpu_budget(cfg: Any) -> int | None:
    """Bytes ``max_memory`` gives the CPU (None: no limit given)."""
    if not cfg.get("max_memory"):
        return None
    from oats.placement import memory_bytes

    return memory_bytes(dict(cfg.max_memory)).get("cpu")


def _human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def plan_markdown(plans: Sequence[MemoryPlan]) -> str:
    """One row per experiment: each part and the peaks, in MiB/GiB."""
    parts = ["weights", "generation", "activations", "block_forward", "statistics", "decomposition", "block_update",
             "dense_targets", "model_update", "evaluation"]
    head = "| experiment | device | " + " | ".join(parts) + " | CPU peak | device peak | other GPUs | notes |"
    rows = [head, "|" + "---|" * (len(parts) + 6)]
    for p in plans:
        cells = [_human(p.parts[k]) if p.parts.get(k) else "–" for k in parts]
        others = ", ".join(f"{d} {_human(b)}" for d, b in sorted(p.other_gpus.items())) or "–"
        rows.append(f"| {p.name} | {p.device} | " + " | ".join(cells) +
                    f" | {_human(p.cpu_peak)} | {_human(p.device_peak) if p.device_peak else '–'} | {others} | {'; '.join(p.notes)} |")
    return "\n".join(rows)


def plan_json(plans: Sequence[MemoryPlan]) -> str:
    return json.dumps([p.as_dict() for p in plans], indent=1)


def machine_memory() -> int:
    """Bytes of memory this process may use: the cgroup limit when one is set, else MemTotal."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
            if text.isdigit() and int(text) < 2**60:
                return int(text)
        except OSError:
            pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# What each key does to the plan, tried in this order when an experiment does not fit.
REMEDIES: tuple[tuple[str, Any], ...] = (("lazy_load", True), ("cal_batch_size", 1), ("stats_dtype", "float32"),
                                         ("eval_batch_size", 1))


# The same for the largest GPU peak (a GPU run, or one whose statistics or evaluation use other GPUs).
GPU_REMEDIES: tuple[tuple[str, Any], ...] = (("lazy_load", True), ("stats_device", "cpu"), ("cal_batch_size", 1),
                                             ("eval_batch_size", 1))


def gpu_peak(p: MemoryPlan) -> int:
    """The largest planned peak of any one GPU (0 for a run that uses none)."""
    return max([p.device_peak, *p.other_gpus.values()])


def remedies(cfg: Any, limit: int, shapes: Shapes | None = None, gpu: bool = False) -> list[str]:
    """The single key changes that bring the CPU peak of ``cfg`` (with ``gpu``: its largest GPU peak)
    under ``limit`` bytes ('lazy_load: True -> 3.1 GiB')."""
    import ml_collections

    out = []
    from oats.config import uses_self_generated

    for key, value in GPU_REMEDIES if gpu else REMEDIES:
        if cfg.get(key) == value or key not in cfg or (key == "lazy_load" and uses_self_generated(cfg)):
            continue  # self-generated calibration needs the whole model in memory
        changed = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
        changed[key] = value
        plan = plan_experiment(changed, shapes)
        peak = gpu_peak(plan) if gpu else plan.cpu_peak
        if peak <= limit:
            out.append(f"{key}: {value!r} -> {_human(peak)}")
    return out

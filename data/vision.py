"""Images for vision runs: Fashion-MNIST (IDX files), ImageNet-style folders, and the photos of
``../shared/data/vision/`` (random crops for calibration), turned into normalised ``pixel_values``.

Preprocessing is a plain one (no hub image processor needed): RGB (greyscale replicated), resized to
``size`` x ``size`` (bicubic, PIL), scaled to [0, 1], normalised with the model's mean/std (ImageNet's
by default). Photos for calibration are random resized crops (seeded: scale 0.25-1 of the area,
aspect 3/4-4/3, as torchvision's RandomResizedCrop). The local root is ``data_dir`` (else env
``OATS_DATA_DIR``); the vision files live under ``<root>/vision/``.
"""
from __future__ import annotations

import gzip
import math
import random
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from data.sources import DataError, resolve_data_dir

VISION_DATASETS = ("photos", "fashion_mnist", "imagefolder")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vision_root(data_dir: str | None) -> Path:
    """``<data_dir or $OATS_DATA_DIR>/vision``; an error naming the key when neither is set."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError("vision data needs a local root: set config key 'data_dir' (or env OATS_DATA_DIR) to a folder laid out like ../shared/data/")
    return root / "vision" if (root / "vision").is_dir() else root


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally .gz): big-endian magic (0, 0, type, ndim), ndim sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise DataError(f"{path}: header says {dims} ({math.prod(dims)} values), file holds {data.size}")
    return data.reshape(dims)


def fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST ``train`` (60,000) or ``test`` (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = Path(root) / "fashion_mnist"
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        p = next((c for c in cands if c.is_file()), None)
        if p is None:
            raise DataError(f"Fashion-MNIST: none of {[str(c) for c in cands]} exists")
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def normalise(images: Sequence, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """pixel_values [N, 3, size, size] float32 from PIL images or uint8 arrays ([H, W] or [H, W, 3])."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im))
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(out).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return ((x - m) / s).contiguous()


def photo_paths(root: Path) -> list[Path]:
    folder = Path(root) / "photos"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []
    if not paths:
        raise DataError(f"no photos under {folder}")
    return paths


def random_resized_crops(images: Sequence, n: int, seed: int, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> list:
    """``n`` random crops (PIL images), image i % len(images) for crop i, boxes drawn from ``random.Random(seed)``."""
    from PIL import Image

    rng = random.Random(seed)
    crops = []
    for i in range(n):
        im = images[i % len(images)]
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        W, H = im.size
        for _ in range(10):
            area = W * H * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            w, h = min(W, H), min(W, H)
        x0, y0 = rng.randint(0, W - w), rng.randint(0, H - h)
        crops.append(im.crop((x0, y0, x0 + w, y0 + h)))
    return crops


def load_photos(root: Path) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in photo_paths(root)]


def image_folder(root: Path, split: str, limit: int | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, class names) of ``<root>/<split>/<class>/*`` (classes sorted by name = label ids),
    the first ``limit`` files in sorted order when given."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"image folder: {folder} is missing; lay it out as {root}/{split}/<class>/<image>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for p in sorted((folder / name).iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                paths.append(p)
                labels.append(c)
    if not paths:
        raise DataError(f"image folder: no images under {folder}/<class>/")
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    return paths, np.asarray(labels, dtype=np.int64), classes


def calibration_images(dataset: str, n: int, size: int, seed: int, data_dir: str | None,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``n`` calibration images as pixel_values [n, 3, size, size]:

    - ``photos``: random resized crops of the staged photos (seeded by ``seed``);
    - ``fashion_mnist``: a seeded draw of ``n`` images from the *last* 50,000 of the train split (the
      linear probe trains on the first ones, so calibration never sees its images);
    - ``imagefolder``: a seeded draw of ``n`` images of ``<data_dir>/train/<class>/*``.
    """
    from PIL import Image

    if dataset == "photos":
        return normalise(random_resized_crops(load_photos(vision_root(data_dir)), n, seed), size, mean, std)
    if dataset == "fashion_mnist":
        images, _ = fashion_mnist(vision_root(data_dir), "train")
        pool = list(range(10_000, images.shape[0]))
        idx = random.Random(seed).sample(pool, n)
        return normalise([images[i] for i in idx], size, mean, std)
    if dataset == "imagefolder":
        root = resolve_data_dir(data_dir)
        if root is None:
            raise DataError("cal_dataset 'imagefolder' needs config key 'data_dir' (a folder with train/<class>/ and val/<class>/)")
        paths, _, _ = image_folder(root, "train")
        idx = random.Random(seed).sample(range(len(paths)), min(n, len(paths)))
        return normalise([Image.open(paths[i]) for i in idx], size, mean, std)
    raise DataError(f"vision calibration data set {dataset!r}; allowed values: {list(VISION_DATASETS)}")

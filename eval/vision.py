"""Vision metrics (a leaf: imports nothing of ``oats``): top-1/top-5 for classifiers; for backbones the
fidelity of features to the dense model's and a linear probe on frozen CLS features; attention maps.

Protocols (stated with every number):

- **top-k** (``vision_eval: topk``): an ImageNet-style ``<data_dir>/val/<class>/*`` folder, classes
  sorted by name = label ids (or matched by name to the model's ``id2label`` when every folder name is
  one of its labels); a sample is right when its label is among the k largest logits.
- **feature fidelity** (``fidelity``): on the linear probe's held-out test images (Fashion-MNIST test,
  the first ``probe_test``, never seen by calibration), the cosine between the compressed and the dense
  model's final features (``last_hidden_state``, after the final norm): ``cls_cos`` = mean over images
  of the CLS token's cosine, ``patch_cos`` = mean over images and patch tokens. The dense features are
  computed once per model and image size and cached (``reference``).
- **linear probe** (``probe``): logistic regression (scikit-learn, lbfgs, C = 1, 1000 iterations, on
  features standardised with the training mean/std) on the frozen CLS features of the first
  ``probe_train`` Fashion-MNIST train images, top-1 on the first ``probe_test`` test images, all resized
  to ``image_size``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

VISION_EVALS = ("fidelity", "probe", "topk")
Forward = Callable[[Tensor], Any]  # pixel_values [B, 3, H, W] -> the model's output (last_hidden_state or logits)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: fraction of rows of ``logits`` [N, C] whose ``labels`` [N] is among the
    k largest (k capped at C). Ties are broken by ``torch.topk``'s order."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits [N, C] and labels [N] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    out = {}
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    for k in ks:
        hit = (top[:, : min(k, logits.shape[1])] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean())
    return out


@torch.no_grad()
def run_batches(forward: Forward, pixel_values: Tensor, batch_size: int, field: str) -> Tensor:
    """``field`` of the outputs (``last_hidden_state`` [N, T, d] or ``logits`` [N, C]) over all images, on the CPU."""
    outs = []
    for s in range(0, pixel_values.shape[0], batch_size):
        o = forward(pixel_values[s : s + batch_size])
        outs.append(getattr(o, field).float().cpu())
    return torch.cat(outs)


def cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (float64), 1 where both rows are zero."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))


def feature_fidelity(hidden: Tensor, reference: Tensor, n_special: int = 1) -> dict[str, float]:
    """Cosines of final features ``hidden`` [N, T, d] to the dense model's ``reference`` [N, T, d]: CLS
    (token 0) mean and minimum over images, patch tokens (after ``n_special`` CLS/register tokens) mean."""
    if hidden.shape != reference.shape:
        raise ValueError(f"features {tuple(hidden.shape)} vs reference {tuple(reference.shape)}")
    cls = cosine_rows(hidden[:, 0], reference[:, 0])
    patch = cosine_rows(hidden[:, n_special:], reference[:, n_special:])
    return {"cls_cos": float(cls.mean()), "cls_cos_min": float(cls.min()), "patch_cos": float(patch.mean())}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0) -> float:
    """Top-1 of a logistic regression (lbfgs, C = 1, 1000 iterations) on standardised features."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    clf.fit((train_x - mu) / sd, train_y)
    return float((clf.predict((test_x - mu) / sd) == test_y).mean())


def probe_images(cfg: Any, mean: Sequence[float], std: Sequence[float]) -> dict[str, Tensor]:
    """Fashion-MNIST probe split as pixel_values: first ``probe_train`` train, first ``probe_test`` test images."""
    from data.vision import fashion_mnist, normalise, vision_root

    root = vision_root(cfg.data_dir)
    tr_x, tr_y = fashion_mnist(root, "train")
    te_x, te_y = fashion_mnist(root, "test")
    n_tr, n_te = int(cfg.probe_train), int(cfg.probe_test)
    return {"train": normalise(list(tr_x[:n_tr]), cfg.image_size, mean, std), "train_labels": torch.from_numpy(tr_y[:n_tr]),
            "test": normalise(list(te_x[:n_te]), cfg.image_size, mean, std), "test_labels": torch.from_numpy(te_y[:n_te])}


def backbone_features(forward: Forward, cfg: Any, mean: Sequence[float], std: Sequence[float],
                      images: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Final features on the probe split: train CLS [n_train, d], test tokens [n_test, T, d], labels."""
    images = images if images is not None else probe_images(cfg, mean, std)
    bs = int(cfg.eval_batch_size)
    out = {"test_hidden": run_batches(forward, images["test"], bs, "last_hidden_state"),
           "train_labels": images["train_labels"], "test_labels": images["test_labels"]}
    out["train_cls"] = run_batches(lambda x: _Cls(forward(x)), images["train"], bs, "last_hidden_state") if "probe" in cfg.vision_eval else None
    return out


class _Cls:
    """Keeps only the CLS token of an output (the probe's training features), so memory stays [N, d]."""

    def __init__(self, out: Any):
        self.last_hidden_state = out.last_hidden_state[:, 0]


def imagefolder_topk(forward: Forward, cfg: Any, mean: Sequence[float], std: Sequence[float],
                     id2label: Mapping[int, str] | None = None) -> dict[str, float]:
    """top-1 / top-5 on ``<data_dir>/val/<class>/*`` (at most ``topk_images``)."""
    from PIL import Image

    from data.sources import DataError, resolve_data_dir
    from data.vision import image_folder, normalise

    root = resolve_data_dir(cfg.data_dir)
    if root is None:
        raise DataError("vision_eval 'topk' needs config key 'data_dir' (a folder with val/<class>/)")
    paths, labels, classes = image_folder(root, "val", cfg.topk_images)
    labels_t = torch.from_numpy(labels)
    if id2label:
        by_name = {str(v): int(k) for k, v in id2label.items()}
        if all(c in by_name for c in classes):
            labels_t = torch.tensor([by_name[classes[int(i)]] for i in labels])
    logits = []
    bs = int(cfg.eval_batch_size)
    with torch.no_grad():
        for s in range(0, len(paths), bs):
            x = normalise([Image.open(p) for p in paths[s : s + bs]], cfg.image_size, mean, std)
            logits.append(forward(x).logits.float().cpu())
    return {**topk_accuracy(torch.cat(logits), labels_t), "n_images": len(paths)}


def vision_metrics(cfg: Any, forward: Forward, mean: Sequence[float], std: Sequence[float],
                   reference: Mapping[str, Tensor] | None = None, features: Mapping[str, Tensor] | None = None,
                   id2label: Mapping[int, str] | None = None, n_special: int = 1) -> dict[str, Any]:
    """Every metric ``cfg.vision_eval`` names, as ``metrics.vision.<metric>``. ``features``: this model's
    ``backbone_features`` when already computed; ``reference``: the dense model's (for fidelity)."""
    out: dict[str, Any] = {"image_size": int(cfg.image_size)}
    kinds = list(cfg.vision_eval)
    if "fidelity" in kinds or "probe" in kinds:
        feats = features if features is not None else backbone_features(forward, cfg, mean, std)
        if "fidelity" in kinds:
            if reference is None:
                raise ValueError("feature fidelity needs the dense model's reference features")
            out["fidelity"] = {**feature_fidelity(feats["test_hidden"], reference["test_hidden"], n_special),
                               "n_images": int(feats["test_hidden"].shape[0])}
        if "probe" in kinds:
            top1 = linear_probe(feats["train_cls"].numpy(), feats["train_labels"].numpy(),
                                feats["test_hidden"][:, 0].numpy(), feats["test_labels"].numpy(), int(cfg.seed))
            out["probe"] = {"top1": top1, "n_train": int(feats["train_cls"].shape[0]), "n_test": int(feats["test_hidden"].shape[0])}
    if "topk" in kinds:
        out["topk"] = imagefolder_topk(forward, cfg, mean, std, id2label)
    return out


# --- attention maps (the paper's picture) -----------------------------------------------------------

def attention_rollout(attentions: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): per block the head-mean attention [B, T, T] mixed with
    the identity (``residual``), rows renormalised, multiplied from the first block up. Returns [B, T, T]."""
    out = None
    for a in attentions:
        a = a.float().mean(1)
        a = residual * torch.eye(a.shape[-1], dtype=a.dtype) + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def cls_maps(attentions: Sequence[Tensor], grid: tuple[int, int], n_special: int = 1) -> dict[str, Tensor]:
    """{'last': CLS attention of the last block (head mean), 'rollout': CLS row of the rollout}, each [B, gh, gw]."""
    last = attentions[-1].float().mean(1)[:, 0, n_special:]
    roll = attention_rollout(attentions)[:, 0, n_special:]
    return {"last": last.reshape(-1, *grid), "rollout": roll.reshape(-1, *grid)}


def _clip_unit(m: Tensor, q: float = 0.99) -> Tensor:
    """Min-max to [0, 1] after clipping at the ``q`` quantile (one high-norm artefact token would
    otherwise leave the rest of the map black)."""
    m = m.float()
    hi = torch.quantile(m.flatten(), q)
    m = m.clamp(max=hi)
    return (m - m.min()) / (m.max() - m.min() + 1e-12)


def plot_attention_maps(image: Any, maps: Mapping[str, Any], path: str, title: str = "") -> None:
    """The photo, then each named map [gh, gw] upsampled and overlaid (clipped at its 99th percentile).
    ``maps`` is {column: map} for one row, or {row: {column: map}} for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = maps if all(isinstance(v, Mapping) for v in maps.values()) else {"": maps}
    img = np.asarray(image)
    n_cols = 1 + max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.0 * n_cols, 3.1 * len(rows) + 0.4), squeeze=False)
    for ax_row, (row_name, row) in zip(axes, rows.items()):
        ax_row[0].imshow(img)
        ax_row[0].set_title(f"photo {row_name}".strip(), fontsize=9)
        for ax, (name, m) in zip(ax_row[1:], row.items()):
            up = torch.nn.functional.interpolate(_clip_unit(m)[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(img)
            ax.imshow(up.numpy(), cmap="inferno", alpha=0.6)
            ax.set_title(name, fontsize=9)
        for ax in ax_row:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

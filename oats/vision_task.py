"""The vision side of an experiment (``modality == 'vision'``, chosen by the architecture adapter):
calibration images instead of token windows, and ``eval.vision`` metrics instead of perplexity.

The dense model's reference features (for feature fidelity) are computed once per model, image size
and probe split and cached under ``data.files.cache_dir('vision_reference')`` (atomic write); a
compressing run without them computes them on the still-dense model before it compresses.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class VisionTask:
    def __init__(self, cfg: Any, model: nn.Module, device: torch.device):
        from oats.vision_models import image_norm

        self.cfg, self.model, self.device = cfg, model, device
        self.mean, self.std = image_norm(cfg.model)
        self.reference: dict[str, Tensor] | None = None
        self._features: dict[str, Tensor] | None = None  # the dense model's own, reused by a dense run's metrics

    def calibration_inputs(self) -> Tensor:
        from data.vision import calibration_images

        c = self.cfg
        return calibration_images(c.cal_dataset, c.cal_nsamples, c.image_size, c.seed, c.data_dir, self.mean, self.std)

    def forward(self, x: Tensor) -> Any:
        return self.model(pixel_values=x.to(self.device))

    def _backbone(self) -> bool:
        return not hasattr(self.model, "classifier") and not hasattr(self.model, "cls_classifier")

    def _reference_key(self) -> str:
        with torch.no_grad():
            fp = [float(sum(p.double().abs().sum() for p in self.model.parameters())), sum(p.numel() for p in self.model.parameters())]
        c = self.cfg
        blob = json.dumps({"model": c.model, "fingerprint": fp, "image_size": c.image_size, "probe_test": c.probe_test,
                           "mean": self.mean, "std": self.std, "dtype": c.dtype, "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _reference_path(self):
        from data.files import cache_dir

        return cache_dir("vision_reference", f"{self._reference_key()}.pt")

    @torch.no_grad()
    def prepare_reference(self) -> None:
        """The dense model's test features for ``fidelity``: from the cache, else computed now (call on the dense model)."""
        if "fidelity" not in self.cfg.vision_eval or not self._backbone():
            return
        from data.files import atomic_write
        from eval.vision import probe_images, run_batches

        path = self._reference_path()
        if path.is_file():
            self.reference = torch.load(path)
            log.info("dense reference features from %s", path)
            return
        self.model.to(self.device)
        images = probe_images(self.cfg, self.mean, self.std)
        hidden = run_batches(self.forward, images["test"], int(self.cfg.eval_batch_size), "last_hidden_state")
        self.model.to("cpu")
        self.reference = {"test_hidden": hidden}
        atomic_write(path, lambda tmp: torch.save(self.reference, tmp))
        log.info("dense reference features cached at %s", path)

    @torch.no_grad()
    def metrics(self, compressed: bool) -> dict[str, Any]:
        """``metrics.vision``; a run that compressed nothing is its own reference (fidelity 1, and cached)."""
        from eval.vision import backbone_features, vision_metrics

        kinds = list(self.cfg.vision_eval)
        backbone = self._backbone()
        if not backbone and any(k in kinds for k in ("fidelity", "probe")):
            raise ValueError(f"vision_eval {kinds}: fidelity/probe need a backbone (no classifier head); use ['topk'] for classifiers")
        if backbone and "topk" in kinds:
            raise ValueError("vision_eval 'topk' needs a classifier (...ForImageClassification); this model is a backbone")
        features = None
        if backbone and "fidelity" in kinds and self.reference is None:
            if compressed:
                raise RuntimeError("feature fidelity: the dense reference was not prepared before compression")
            key_path = self._reference_path()
            self.model.to(self.device)
            features = backbone_features(self.forward, self.cfg, self.mean, self.std)
            self.reference = {"test_hidden": features["test_hidden"]}
            from data.files import atomic_write

            atomic_write(key_path, lambda tmp: torch.save(self.reference, tmp))
        self.model.to(self.device)
        c = self.model.config
        size, patch = int(self.cfg.image_size), int(getattr(c, "patch_size", 16))
        n_special = 1
        if backbone:
            probe = self.model(pixel_values=torch.zeros(1, 3, size, size, device=self.device)).last_hidden_state
            n_special = probe.shape[1] - (size // patch) ** 2  # CLS (+ distillation / register tokens)
        out = vision_metrics(self.cfg, self.forward, self.mean, self.std, reference=self.reference, features=features,
                             id2label=getattr(c, "id2label", None), n_special=n_special)
        self.model.to("cpu")
        return {"vision": out}

"""What an experiment does with its data, by the model's modality (the architecture adapter's
``modality``): a task gives the calibration inputs, prepares what evaluation compares against while the
model is still dense, and evaluates the (compressed) model into the record's fields.

- ``TextTask``: token windows of ``cal_dataset`` (a corpus, text the dense model writes, or a mix of
  these); token perplexity on ``eval_datasets`` (streamed block
  by block under ``lazy_load``) and the lm_eval evaluations (``eval.evaluate``). With ``device_map``
  every metric runs on the model placed across devices (``oats.placement``): the model in memory
  dispatched, or under ``lazy_load`` the saved model loaded placed from its shards.
- ``VisionTask``: calibration images; ``eval.vision`` metrics (top-k, feature fidelity, linear probe).

``task_for`` picks one and checks that the config's data matches the model's modality.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from data.files import torch_dtype
from oats.keys import ConfigError

log = logging.getLogger(__name__)


class Task(Protocol):
    modality: str

    def calibration_inputs(self) -> Tensor:
        """The model's calibration inputs, [n, ...] (token ids [n, L] or pixel values [n, 3, H, W])."""

    def update_inputs(self) -> Tensor | None:
        """A model update's own inputs (``update_dataset``), or None: it trains on the calibration inputs."""

    def prepare_reference(self) -> None:
        """Runs on the dense model before anything is compressed (what evaluation compares against)."""

    def evaluate(self, weights: Any, model_dir: Path | None, compressed: bool, exp_dir: Path | None = None) -> dict[str, Any]:
        """The record's evaluation fields ('metrics', and what else the modality records); ``exp_dir``
        is the experiment's folder (where a placed evaluation offloads to disk)."""


def cannot_generate(model: str, what: str) -> str:
    """The one-line reason a model cannot give ``self_generated`` calibration text."""
    return (f"'self_generated' samples calibration text from the model, and {model!r} is {what}, which cannot generate "
            f"text; calibrate it on its own kind of data")


def check_modality(modality: str, cfg: Any) -> None:
    """The config's data are of the model's modality ('text' or 'vision'), else a ConfigError on ``cal_dataset``."""
    from oats.config import is_vision_config, self_generated_key, uses_self_generated

    vision_model = modality == "vision"
    if vision_model and uses_self_generated(cfg):
        raise ConfigError(self_generated_key(cfg), cannot_generate(cfg.model, "an image transformer"))
    if vision_model != is_vision_config(cfg):
        what = "an image transformer" if vision_model else "a language model"
        want = "an image data set (photos, fashion_mnist, imagefolder)" if vision_model else "a text corpus"
        raise ConfigError("cal_dataset", f"{cfg.cal_dataset!r}, but model {cfg.model!r} is {what}; use {want}")


def task_for(cfg: Any, weights: Any, tokenizer: Any, device: torch.device) -> Task:
    """The task of the model's modality; the config's data must be of the same modality."""
    from oats.architectures import architecture_of

    modality = architecture_of(weights.model).modality
    check_modality(modality, cfg)
    return (VisionTask if modality == "vision" else TextTask)(cfg, weights, tokenizer, device)


class TextTask:
    """A language model's experiment: calibration token windows, perplexity and lm_eval evaluations."""

    modality = "text"

    def __init__(self, cfg: Any, weights: Any, tokenizer: Any, device: torch.device):
        self.cfg, self.weights, self.tokenizer, self.device = cfg, weights, tokenizer, device
        self.generated: dict[str, Any] | None = None  # the self-generated windows' fingerprint, once made
        self.update_generated: dict[str, Any] | None = None  # the same of the model update's text

    def calibration_inputs(self) -> Tensor:
        """[cal_nsamples, cal_seqlen] token ids: each source's share of the windows (``oats.config.cal_sources``),
        in ``cal_dataset``'s order; ``self_generated`` windows come from the model, so call this while it is dense."""
        from oats.config import cal_sources

        sources = cal_sources(self.cfg)
        if len(sources) > 1:
            log.info("calibration mix: %s windows of %d tokens", ", ".join(f"{n} {name}" for name, n in sources), self.cfg.cal_seqlen)
        tokens, self.generated = self._windows(sources)
        return tokens

    def update_inputs(self) -> Tensor | None:
        """[cal_nsamples, cal_seqlen] token ids of ``update_dataset`` (the model update's text), or None when
        the update trains on the calibration windows; call while the model is dense, like ``calibration_inputs``."""
        from oats.config import update_sources

        sources = update_sources(self.cfg)
        if not sources:
            return None
        log.info("model update text: %d windows of %d tokens of %s", sources[0][1], self.cfg.cal_seqlen, sources[0][0])
        tokens, self.update_generated = self._windows(sources)
        return tokens

    def _windows(self, sources: list[tuple[str, int]]) -> tuple[Tensor, dict[str, Any] | None]:
        """The sources' windows joined in order, and the fingerprint of the self-generated ones (None when
        there are none)."""
        from data import calibration_windows
        from data.self_generated import SELF_GENERATED, self_generated_windows

        c, parts, generated = self.cfg, [], None
        for name, n in sources:
            if name == SELF_GENERATED:
                tokens, generated = self_generated_windows(self.weights.model, self.tokenizer, c.model, c.dtype, n, c.cal_seqlen,
                                                           c.seed, c.cal_temperature, c.cal_top_p, c.cal_batch_size, self.device)
            else:
                tokens = calibration_windows(self.tokenizer, name, n, c.cal_seqlen, c.cal_sampler, c.seed, c.data_dir)
            parts.append(tokens)
        return torch.cat(parts), generated

    def calibration_record(self) -> dict[str, Any]:
        """The record's ``calibration`` of a mix or of self-generated text: windows per source, and the
        generated windows' fingerprint (a resumed run reads it from the cache); with ``update_dataset``,
        ``update`` says the same of the model update's text. Empty for one corpus and no update text."""
        from data.self_generated import SELF_GENERATED
        from oats.config import cal_sources, update_sources

        c = self.cfg
        out: dict[str, Any] = {}
        if not isinstance(c.cal_dataset, str) or c.cal_dataset == SELF_GENERATED:
            out = self._sources_record(cal_sources(c), self.generated)
        if update := update_sources(c):
            out["update"] = {"dataset": update[0][0], **self._sources_record(update, self.update_generated)}
        return out

    def _sources_record(self, sources: list[tuple[str, int]], generated: dict[str, Any] | None) -> dict[str, Any]:
        from data.self_generated import SELF_GENERATED, cache_key, cached_fingerprint

        c = self.cfg
        out: dict[str, Any] = {"windows": dict(sources)}
        n_generated = dict(sources).get(SELF_GENERATED)
        if n_generated:
            out[SELF_GENERATED] = generated or cached_fingerprint(
                cache_key(c.model, c.dtype, c.seed, c.cal_temperature, c.cal_top_p, n_generated, c.cal_seqlen))
        return out

    def prepare_reference(self) -> None:
        pass  # perplexity and zero-shot accuracy need no dense reference

    def evaluate(self, weights: Any, model_dir: Path | None, compressed: bool, exp_dir: Path | None = None) -> dict[str, Any]:
        from data import eval_tokens
        from eval.evaluate import evaluate
        from eval.perplexity import n_windows

        cfg = self.cfg
        out: dict[str, Any] = {"data": data_fingerprints(cfg), "eval_tokens": {}}
        if compressed and (calibration := self.calibration_record()):
            out["calibration"] = calibration

        def tokens_of(name: str) -> Tensor:
            tokens = eval_tokens(self.tokenizer, name, cfg.data_dir)
            out["eval_tokens"][name] = n_windows(tokens.shape[1], cfg.eval_seqlen, cfg.eval_max_windows) * cfg.eval_seqlen
            return tokens

        if not cfg.get("device_map") and not (weights.lazy and (cfg.zero_shot_tasks or cfg.word_perplexity)):
            out["metrics"] = evaluate(cfg, tokens_of, self.tokenizer, self._token_perplexity(weights), _whole_model(weights, model_dir, self.device))
            return out
        if cfg.get("device_map"):
            placed = PlacedEvaluation(cfg, weights, model_dir, exp_dir)
            token_perplexity = placed.perplexity
        else:  # lazy_load: lm_eval gets the saved model placed with about one block in memory, the rest read from its shards
            placed = PlacedEvaluation(_one_block_placement(cfg, self.device), weights, model_dir, exp_dir)
            token_perplexity = self._token_perplexity(weights)
        try:
            out["metrics"] = evaluate(cfg, tokens_of, self.tokenizer, token_perplexity, placed.model)
        finally:
            summary = placed.close()
            if summary is not None:
                out["placement"] = summary
        return out

    def _token_perplexity(self, weights: Any) -> Callable[[Tensor], float]:
        from eval.perplexity import perplexity

        cfg, device = self.cfg, self.device
        if not weights.lazy:
            return lambda tokens: perplexity(weights.model, tokens, cfg.eval_seqlen, cfg.eval_max_windows, cfg.eval_batch_size, device)
        return lambda tokens: streamed_perplexity(weights, tokens, cfg.eval_seqlen, cfg.eval_max_windows, device, cfg.eval_batch_size)


def streamed_perplexity(weights: Any, tokens: Tensor, seqlen: int, max_windows: int | None, device: torch.device,
                        batch_size: int = 1) -> float:
    """Token perplexity (the protocol of ``eval.perplexity``) computed one block at a time, each block's
    weights loaded just before and freed just after it runs (never the whole model in memory)."""
    from eval.perplexity import perplexity_of, windows_of
    from oats.pipeline import streamed_outputs

    windows = windows_of(tokens, seqlen, max_windows)
    return perplexity_of(streamed_outputs(weights.model, windows, device, batch_size, weights=weights, desc="streamed perplexity"))


def _whole_model(weights: Any, model_dir: Path | None, device: torch.device) -> Callable[[], nn.Module]:
    """The model lm_eval needs whole, in memory: the model itself on the compute device (a lazily loaded
    model is placed instead, ``_one_block_placement``)."""
    return lambda: weights.model.to(device)


def _one_block_placement(cfg: Any, device: torch.device) -> Any:
    """``cfg`` with the placement that keeps about the head and two blocks' weights on the compute device
    (and nothing else in memory): what ``lazy_load`` gives lm_eval, whose evaluations need the whole model."""
    import ml_collections

    from oats.plan import shapes_of

    s = shapes_of(cfg.model)
    size = torch_dtype(cfg.dtype).itemsize
    budget = (s.head_params + 2 * s.block_params) * size
    memory = {"cuda:0": budget, "cpu": 1} if device.type == "cuda" else {"cpu": budget}
    return ml_collections.ConfigDict({**cfg.to_dict(), "device_map": "auto", "max_memory": memory, "offload_dir": None})


class PlacedEvaluation:
    """The model every metric of a ``device_map`` run evaluates, placed once on first use: in memory,
    the model itself dispatched (put back by ``close``); lazy, the saved model at ``model_dir`` loaded
    placed from its shards (tensors on a device read one at a time, those on disk left in the shards).
    Inputs go to the map's main device. ``close`` returns the record's ``placement`` (None when nothing
    was placed)."""

    def __init__(self, cfg: Any, weights: Any, model_dir: Path | None, exp_dir: Path | None):
        if exp_dir is None:
            raise ValueError("config key 'device_map': a placed evaluation needs the experiment folder (for its offload folder)")
        self.cfg, self.weights, self.model_dir, self.exp_dir = cfg, weights, model_dir, Path(exp_dir)
        self.placed: Any = None

    def model(self) -> nn.Module:
        if self.placed is None:
            from oats.placement import load_placed, place

            if self.weights.lazy:
                self.placed = load_placed(self.model_dir, self.cfg, self.exp_dir)
            else:
                self.placed = place(self.weights.model, self.cfg, self.exp_dir)
        return self.placed.model

    def perplexity(self, tokens: Tensor) -> float:
        from eval.perplexity import perplexity

        c = self.cfg
        model = self.model()
        return perplexity(model, tokens, c.eval_seqlen, c.eval_max_windows, c.eval_batch_size, self.placed.input_device)

    def close(self) -> dict[str, Any] | None:
        return self.placed.close() if self.placed is not None else None


def data_fingerprints(cfg: Any) -> dict[str, Any]:
    """Size and hash of every corpus split the experiment reads ('cal:pydoc', 'eval:wikitext2'...).
    Self-generated text is no corpus: the config decides it (its fingerprint is the record's ``calibration``)."""
    from data import corpus_fingerprint
    from data.self_generated import SELF_GENERATED
    from oats.config import cal_names, selected_plugins

    out = {}
    if selected_plugins(cfg)["method"].compresses:
        for name in cal_names(cfg):
            if name != SELF_GENERATED:
                out[f"cal:{name}"] = corpus_fingerprint(name, "train", cfg.data_dir)
        update = cfg.get("update_dataset")
        if update is not None and update != SELF_GENERATED:
            out[f"update:{update}"] = corpus_fingerprint(update, "train", cfg.data_dir)
    for d in cfg.eval_datasets:
        out[f"eval:{d}"] = corpus_fingerprint(d, "test", cfg.data_dir)
    return out


class VisionTask:
    """An image transformer's experiment: calibration images, dense reference features, ``eval.vision`` metrics.

    The dense model's reference features (for feature fidelity) are computed once per model, image size
    and probe split and cached under ``data.files.cache_dir('vision_reference')`` (atomic write); a
    compressing run without them computes them on the still-dense model before it compresses.
    """

    modality = "vision"

    def __init__(self, cfg: Any, weights: Any, tokenizer: Any, device: torch.device):
        from oats.vision_models import image_norm

        if cfg.checkpoint_blocks:
            raise ValueError("config key 'checkpoint_blocks': not supported for vision models (a resumed run has no dense reference features); set it False")
        self.cfg, self.model, self.device = cfg, weights.model, device
        self.mean, self.std = image_norm(cfg.model)
        self.reference: dict[str, Tensor] | None = None
        self._features: dict[str, Tensor] | None = None  # the dense model's own, reused by a dense run's metrics

    def calibration_inputs(self) -> Tensor:
        """pixel_values [cal_nsamples, 3, image_size, image_size], normalised as the model expects."""
        from data.vision import calibration_images

        c = self.cfg
        return calibration_images(c.cal_dataset, c.cal_nsamples, c.image_size, c.seed, c.data_dir, self.mean, self.std)

    def update_inputs(self) -> None:
        return None  # a model update distils next-token distributions: the config allows none on images

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
    def evaluate(self, weights: Any, model_dir: Path | None, compressed: bool, exp_dir: Path | None = None) -> dict[str, Any]:
        """{'metrics': {'vision': ...}}; a run that compressed nothing is its own reference (fidelity 1, and cached)."""
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
        return {"metrics": {"vision": out}}

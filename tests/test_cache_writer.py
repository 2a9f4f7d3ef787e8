"""The converted-model caches are written by ``data.files.atomic_cache_dir``: renamed into place whole,
nothing left behind on a failure, and every folder and file with the modes the user's umask gives.

The SmolLM2 and DINOv2 caches run their real cache-writing code; only the slow conversion input (the
GGUF dequantisation, the ONNX read) is replaced by a tiny model.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from data.files import atomic_cache_dir

UMASK = 0o027


@pytest.fixture
def umask_027():
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it, by path relative to ``root``."""
    out = {".": root.stat().st_mode & 0o777}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = p.stat().st_mode & 0o777
    return out


def assert_umask_modes(root: Path) -> None:
    want_dir, want_file = 0o777 & ~UMASK, 0o666 & ~UMASK
    got = modes(root)
    want = {k: (want_dir if (root / k).is_dir() else want_file) for k in got}
    assert got == want, {k: oct(v) for k, v in got.items()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# --- the helper -------------------------------------------------------------------------------------

def test_atomic_cache_dir_renames_a_complete_folder_with_umask_modes(tmp_path, umask_027):
    final = tmp_path / "cache" / "model"
    with atomic_cache_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.is_dir() and not final.exists()
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
    assert leftovers(final.parent) == ["model"]
    assert (final / "config.json").read_text() == "{}" and (final / "sub" / "w.bin").read_bytes() == b"x"
    assert_umask_modes(final)


def test_atomic_cache_dir_replaces_an_incomplete_folder(tmp_path, umask_027):
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("stale")
    with atomic_cache_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert leftovers(final) == ["model.safetensors"]


def test_a_failure_inside_leaves_the_old_folder_and_no_temporary_one(tmp_path, umask_027):
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_cache_dir(final) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("disk full")
    assert leftovers(tmp_path) == ["model"] and (final / "config.json").read_text() == "old"


# --- the DINOv2 cache (oats.vision_models) ----------------------------------------------------------

def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                                    image_size=28)).eval()


@pytest.fixture
def vision_cache(tmp_path, monkeypatch):
    """oats.vision_models with its cache in tmp_path and the ONNX conversion replaced by a tiny Dinov2Model."""
    import oats.vision_models as vm

    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(vm, "embedded_onnx", lambda name: tmp_path / "unused.onnx")
    monkeypatch.setattr(vm, "convert_onnx_dinov2", lambda path: _tiny_dinov2())
    return vm


def test_dinov2_cache_follows_the_umask(tmp_path, vision_cache, umask_027):
    path = vision_cache.embedded_vision_checkpoint("dinov2-small-imgfocus")
    assert path.parent == tmp_path and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    assert leftovers(tmp_path) == [path.name]
    assert_umask_modes(path)


def test_dinov2_cache_failing_mid_write_leaves_nothing(tmp_path, vision_cache, monkeypatch, umask_027):
    model = _tiny_dinov2()
    real_save = model.save_pretrained

    def save_then_fail(directory, **kw):
        real_save(directory, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    monkeypatch.setattr(vision_cache, "convert_onnx_dinov2", lambda path: model)
    with pytest.raises(OSError, match="disk full"):
        vision_cache.embedded_vision_checkpoint("dinov2-small-imgfocus")
    assert leftovers(tmp_path) == []


# --- the SmolLM2 cache (oats.models) ----------------------------------------------------------------

class _Tokenizer:
    """Stands in for the GGUF tokenizer: ``save_pretrained`` writes its files, or fails after the first."""

    fail = False

    def save_pretrained(self, directory):
        Path(directory, "tokenizer_config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")
        Path(directory, "tokenizer.json").write_text("{}")


@pytest.fixture
def smollm2_cache(tmp_path, monkeypatch):
    """oats.models with its cache in tmp_path and the GGUF reads replaced by a tiny Llama (the state-dict
    copy into a plain model and the cache writing run as they are)."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    import transformers
    from transformers import LlamaConfig

    import oats.models as models

    real_auto = transformers.AutoModelForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    tok = _Tokenizer()

    class AutoConfig:
        @staticmethod
        def from_pretrained(directory, gguf_file=None, **kw):
            return LlamaConfig.from_dict(config.to_dict())

    class AutoModelForCausalLM:
        @staticmethod
        def from_pretrained(directory, gguf_file=None, **kw):
            torch.manual_seed(0)
            return real_auto.from_config(config, dtype=torch.float32)

        from_config = staticmethod(real_auto.from_config)

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(directory, gguf_file=None, **kw):
            return tok

    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf", lambda name: (tmp_path, "unused.gguf"))
    monkeypatch.setattr(transformers, "AutoConfig", AutoConfig)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", AutoModelForCausalLM)
    monkeypatch.setattr(transformers, "AutoTokenizer", AutoTokenizer)
    return models, tok


def test_smollm2_cache_follows_the_umask(tmp_path, smollm2_cache, umask_027):
    models, _ = smollm2_cache
    path = models.embedded_checkpoint("smollm2-135m")
    assert path.parent == tmp_path / "cache" and leftovers(path.parent) == [path.name]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(leftovers(path)) and any(path.glob("*.safetensors"))
    assert_umask_modes(path)
    assert models.embedded_checkpoint("smollm2-135m") == path  # a complete cache is read, not rewritten


def test_smollm2_cache_failing_mid_write_leaves_nothing(tmp_path, smollm2_cache, umask_027):
    models, tok = smollm2_cache
    tok.fail = True
    with pytest.raises(OSError, match="disk full"):
        models.embedded_checkpoint("smollm2-135m")
    assert leftovers(tmp_path / "cache") == []

"""Shared fixtures: one loaded SmolLM2 for the whole session, tiny random models, the shared data root,
and the check that a bad config fails in one line before any model loads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(os.environ.get("OATS_DATA_DIR") or ROOT.parent / "shared" / "data")  # the one data env var


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, float32 on the CPU. Tests must not modify it:
    use ``fresh_smollm2`` for a copy they may compress."""
    from oats.models import load_model

    return load_model("smollm2-135m", "float32")


@pytest.fixture
def fresh_smollm2(smollm2):
    import copy

    model, tok = smollm2
    return copy.deepcopy(model), tok


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    """A randomly initialised tiny causal LM of a given architecture family (float32, eval mode)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA} (set OATS_DATA_DIR to a folder laid out like it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2) -> Path:
    """A local model directory: a 2-block random Llama with SmolLM2's tokenizer (fast end-to-end runs)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load (in memory, the embedded checkpoint, lazily from shards, an image model) fails the test."""
    import oats.models
    import oats.vision_models
    import oats.weights

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(oats.models, "load_model", boom)
    monkeypatch.setattr(oats.models, "embedded_checkpoint", boom)
    monkeypatch.setattr(oats.vision_models, "load_vision_model", boom)
    monkeypatch.setattr(oats.weights.LazyModel, "from_dir", classmethod(lambda cls, *a, **k: boom()))


def preflight_models_cannot_generate(monkeypatch) -> None:
    """The preflight's weightless models say they cannot generate text (an encoder-like head)."""
    from oats import preflight

    real = preflight._meta_model

    def no_head(name):
        model = real(name)
        monkeypatch.setattr(model, "can_generate", lambda: False)
        return model

    monkeypatch.setattr(preflight, "_meta_model", no_head)


def config_error(tmp_path: Path, capsys, text: str) -> str:
    """``main`` on a config file holding ``text``: it must exit 2 with a one-line error, which is returned."""
    import main

    f = tmp_path / "cfg.py"
    f.write_text(text)
    rc = main.main(["--config", str(f), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err

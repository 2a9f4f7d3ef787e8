"""Export: bitmask / N:M layouts (exact round trips, byte formulas), and exported models that stock
transformers (and PEFT for OATS layers) load with the compressed model's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from export import (COMPRESSED_TENSORS_NOTE, bitmask_bytes, choose_layout, dense_bytes, export_from_dir, export_model,
                    is_nm, nm_bytes, pack_bitmask, pack_nm, size_report, unpack_bitmask, unpack_nm)
from export.formats import safetensors_tensor_bytes
from export.oats_bitmask import WEIGHTS_NAME
from factored.module import SparseLowRankLinear, compressed_layers, save_compressed
from factored.module import set_module
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _sparse(shape, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)).to(dtype)


def _nm(shape, n, m, seed=0, drop=0.0):
    """An N:M weight; ``drop`` zeroes some kept entries too (groups with fewer than N nonzeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    score = torch.rand(shape[0], shape[1] // m, m, generator=g)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, score.topk(n, dim=-1).indices, True)
    w = w * keep.reshape(shape)
    if drop:
        w = w * (torch.rand(*shape, generator=g) >= drop)
    return w


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,density", [((7, 13), 0.5), ((64, 96), 0.1), ((3, 5), 0.0), ((4, 8), 1.0)])
def test_bitmask_round_trip_and_bytes(dtype, shape, density):
    w = _sparse(shape, density, dtype)
    values, mask = pack_bitmask(w)
    assert mask.dtype == torch.uint8 and mask.numel() == -(-w.numel() // 8)
    assert values.dtype == dtype and values.numel() == int((w != 0).sum())
    assert torch.equal(unpack_bitmask(values, mask, shape), w)
    assert values.numel() * values.element_size() + mask.numel() == bitmask_bytes(shape, values.numel(), dtype)


def test_bitmask_bit_order_is_row_major_little():
    w = torch.zeros(2, 8)
    w[0, 0], w[0, 3], w[1, 7] = 1.0, 2.0, 3.0
    values, mask = pack_bitmask(w)
    assert mask.tolist() == [0b1001, 0b10000000] and values.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_nm_round_trip_and_bytes(n, m, drop):
    for dtype in (torch.float32, torch.bfloat16):
        w = _nm((12, 32), n, m, drop=drop).to(dtype)
        assert is_nm(w, n, m)
        values, idx = pack_nm(w, n, m)
        assert values.shape == (12, 32 // m * n) and idx.dtype == torch.uint8
        assert torch.equal(unpack_nm(values, idx, (12, 32), n, m), w)
        assert values.numel() * values.element_size() + idx.numel() == nm_bytes((12, 32), n, m, dtype)
    assert nm_bytes((1, 16), 2, 4, torch.bfloat16) == 8 * 2 + 2  # 8 kept bf16 values + 8 x 2-bit indices
    with pytest.raises(ValueError):
        pack_nm(torch.ones(2, 8), 2, 4)


def test_layout_choice_and_the_bfloat16_target():
    w = _sparse((256, 512), 0.5, torch.bfloat16)
    lay = choose_layout(w)
    assert lay["format"] == "bitmask"
    ratio = lay["bytes"] / dense_bytes(w.shape, w.dtype)
    assert ratio <= 0.6 and ratio == pytest.approx((0.5 * 2 + 1 / 8) / 2, abs=0.01)
    assert choose_layout(_nm((16, 64), 2, 4).to(torch.bfloat16))["format"] == "nm"
    assert choose_layout(_nm((16, 64), 2, 8))["n"] == 2 and choose_layout(_nm((16, 64), 2, 8))["m"] == 8
    assert choose_layout(torch.randn(16, 16))["format"] == "dense"  # a dense weight stays dense
    assert choose_layout(torch.ones(16))["format"] == "dense"  # 1-D
    assert choose_layout(_nm((16, 64), 2, 4), nm=None)["format"] == "bitmask"


# ---------------------------------------------------------------------------------------------- models


def _oats_tiny(ranks=(0, 2, 4), density=0.5, seed=0, dtype=torch.float32):
    """Tiny random Llama whose block linears are SparseLowRankLinear (ranks cycle, rank 0 = sparse only)."""
    model = tiny_model("llama").to(dtype)
    g = torch.Generator().manual_seed(seed)
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for i, (name, lin) in enumerate(lins):
        W = lin.weight.detach().float()
        S = W * (torch.rand(W.shape, generator=g) < density)
        r = ranks[i % len(ranks)]
        U, V = torch.randn(W.shape[0], r, generator=g) * 0.1, torch.randn(r, W.shape[1], generator=g) * 0.1
        set_module(model, name, SparseLowRankLinear.from_factors(S, U, V, None, dtype=dtype))
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def test_dense_export_loads_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _oats_tiny()
    ref = _logits(model, IDS)
    rep = export_model(model, tmp_path / "d", "dense")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert torch.allclose(_logits(back, IDS), ref, atol=1e-5, rtol=1e-5)
    assert rep["total"]["ratio"] == 1.0 and compressed_layers(model)  # the model is left as it was
    assert json.loads((tmp_path / "d" / "oats_export.json").read_text())["format"] == "dense"


def test_bitmask_export_loads_with_trust_remote_code_and_is_small(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = _oats_tiny()
    ref = _logits(model, IDS)
    out = tmp_path / "b"
    rep = export_model(model, out, "bitmask")
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(back) is LlamaForCausalLM  # the plain architecture, dense weights
    assert torch.allclose(_logits(back, IDS), ref, atol=1e-5, rtol=1e-5)
    # sizes: every encoded weight's bytes are the formula's, and the file is tensors + header
    for name, e in rep["layers"].items():
        numel = e["shape"][0] * e["shape"][1]
        expect = bitmask_bytes(e["shape"], e["nnz"], torch.float32) + e["rank"] * sum(e["shape"]) * 4
        assert e["format"] == "bitmask" and e["bytes"] == expect and e["dense_bytes"] == numel * 4
    tensors, header = safetensors_tensor_bytes(out / WEIGHTS_NAME)
    assert (out / WEIGHTS_NAME).stat().st_size == sum(t["bytes"] for t in tensors.values()) + header
    assert header < 200 * len(tensors) + 4096  # header overhead bounded
    assert rep["total"]["tensor_bytes"] == sum(t["bytes"] for t in tensors.values())
    assert rep["total"]["n_encoded"] == 14
    # stock loading without trust_remote_code fails loudly (no model.safetensors), never silently random
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_bitmask_reader_is_standalone(tmp_path):
    out = tmp_path / "s"
    export_model(_oats_tiny(), out, "bitmask")
    src = (out / "oats_bitmask.py").read_text()
    import re

    imports = re.findall(r"^\s*(?:from|import) (\w+)", src, flags=re.M)
    assert set(imports) <= {"__future__", "json", "math", "pathlib", "numpy", "torch", "transformers", "safetensors", "sys"}, imports
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True); "
            "print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape[-1])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["LlamaForCausalLM", "128"]


@pytest.mark.parametrize("base_format", ["bitmask", "dense"])
def test_peft_export_reproduces_logits(tmp_path, base_format):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _oats_tiny()
    ref = _logits(model, IDS)
    out = tmp_path / "p"
    rep = export_model(model, out, "peft", base_format=base_format)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = {n: m.rank for n, m in compressed_layers(model).items()}
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r > 0)  # rank 0: not in the adapter
    for n in cfg["target_modules"]:
        assert cfg["rank_pattern"].get(n, cfg["r"]) == ranks[n] == cfg["alpha_pattern"].get(n, cfg["lora_alpha"])
    base = AutoModelForCausalLM.from_pretrained(out / "base", trust_remote_code=base_format == "bitmask")
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    assert torch.allclose(_logits(peft_model, IDS), ref, atol=1e-5, rtol=1e-5)
    # the adapter's weights are U and V exactly, and it can be fine-tuned
    sd = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    name = cfg["target_modules"][0]
    layer = compressed_layers(model)[name]
    assert torch.equal(next(v for k, v in sd.items() if name + ".lora_B" in k), layer.U.detach())
    assert torch.equal(next(v for k, v in sd.items() if name + ".lora_A" in k), layer.V.detach())
    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base", trust_remote_code=base_format == "bitmask"),
                                          out / "adapter", is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)
    if base_format == "bitmask":
        assert rep["total"]["ratio"] < 0.8
        assert all(e["rank"] == ranks[n.removesuffix(".weight")] for n, e in rep["layers"].items())


def test_sparse_only_model_bf16_is_under_0_6_and_nm_is_detected(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama").to(torch.bfloat16)
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for i, (n, lin) in enumerate(lins):  # magnitude 50% per row, or 2:4 for the first block
            W = lin.weight
            if n.startswith("model.layers.0."):
                g = W.abs().reshape(W.shape[0], -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(2, -1).indices, True)
                W.mul_(keep.reshape(W.shape))
            else:
                k = W.shape[1] // 2
                thr = W.abs().float().kthvalue(W.shape[1] - k, dim=1, keepdim=True).values
                W.mul_(W.abs().float() > thr)
    ref = _logits(model, IDS)
    rep = export_model(model, tmp_path / "s", "bitmask")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=True)
    assert next(back.parameters()).dtype == torch.bfloat16
    sd = back.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())  # exact: the same bf16 weights
    assert torch.allclose(_logits(back, IDS), ref, atol=0.02, rtol=0.02)  # (eager vs sdpa attention in bf16)
    fmts = {n: e["format"] for n, e in rep["layers"].items()}
    assert all(f == "nm" for n, f in fmts.items() if n.startswith("model.layers.0.")) and len(fmts) == 14
    assert all(f == "bitmask" for n, f in fmts.items() if n.startswith("model.layers.1."))
    pruned = sum(e["bytes"] for e in rep["layers"].values()) / sum(e["dense_bytes"] for e in rep["layers"].values())
    assert pruned <= 0.6  # 0.5625 at 50%
    with pytest.raises(ValueError, match="peft"):
        export_model(model, tmp_path / "x", "peft")


def test_export_from_saved_dir_and_unknown_formats(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = _oats_tiny()
    ref = _logits(model, IDS)
    save_compressed(model, tmp_path / "saved")
    rep = export_from_dir(tmp_path / "saved", tmp_path / "out", "bitmask")
    assert rep["format"] == "bitmask"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.allclose(_logits(back, IDS), ref, atol=1e-5, rtol=1e-5)
    assert size_report(tmp_path / "out")["total"] == rep["total"]
    # a plain checkpoint with a tokenizer: exported with it
    rep = export_from_dir(tiny_model_dir, tmp_path / "plain", "dense")
    assert (tmp_path / "plain" / "tokenizer_config.json").is_file() and rep["total"]["ratio"] == 1.0
    with pytest.raises(ValueError, match="sparsity"):
        export_model(model, tmp_path / "ct", "compressed-tensors")
    assert "compressed-tensors" in COMPRESSED_TENSORS_NOTE
    with pytest.raises(ValueError, match="choose one of"):
        export_model(model, tmp_path / "zz", "gguf")


def test_smollm2_peft_export_reproduces_logits(tmp_path, fresh_smollm2):
    """SmolLM2-135M with block 0 pruned 2:4 and block 1 made OATS-shaped (S + U V): bitmask base + LoRA
    adapter loaded by stock transformers + PEFT gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparse_lowrank.common import oats_budget

    model, tok = fresh_smollm2
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, lin in list(model.model.layers[0].named_modules()):
            if isinstance(lin, nn.Linear):
                W = lin.weight
                a = W.abs().reshape(W.shape[0], -1, 4)
                W.mul_(torch.zeros_like(a, dtype=torch.bool).scatter_(2, a.topk(2, -1).indices, True).reshape(W.shape))
        for n, lin in list(model.model.layers[1].named_modules()):
            if isinstance(lin, nn.Linear):
                W = lin.weight.detach()
                b = oats_budget(W.shape[0], W.shape[1], 0.5, 0.25)
                thr = W.abs().topk(b.keep_per_row, dim=1).values[:, -1:]
                S = W * (W.abs() >= thr)
                U, V = torch.randn(W.shape[0], b.rank, generator=g) * 0.01, torch.randn(b.rank, W.shape[1], generator=g) * 0.01
                set_module(model.model.layers[1], n, SparseLowRankLinear.from_factors(S, U, V))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = _logits(model, ids)
    rep = export_model(model, tmp_path / "smol", "peft", tokenizer=tok)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "smol" / "base", trust_remote_code=True)
    back = PeftModel.from_pretrained(base, tmp_path / "smol" / "adapter")
    assert torch.allclose(_logits(back, ids), ref, atol=1e-4, rtol=1e-4)
    assert len(rep["layers"]) == 14 and sum(e["rank"] > 0 for e in rep["layers"].values()) == 7
    for n, e in rep["layers"].items():
        two_four = nm_bytes(e["shape"], 2, 4, torch.float32)
        if e["format"] == "nm":
            assert e["bytes"] == two_four
        else:  # bitmask; for the 2:4 block only where some kept weights are exactly 0 (then it is smaller)
            assert e["bytes"] == bitmask_bytes(e["shape"], e["nnz"], torch.float32) + e["rank"] * sum(e["shape"]) * 4
            assert n.startswith("model.layers.1.") or e["bytes"] < two_four
    assert (tmp_path / "smol" / "base" / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------ the layer's own tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (3, 96), (4, 40), (3, 70), (6, 36), (2, 1), (1, 33)])
def test_bitmask_from_layer_is_pack_bitmask_of_s(dtype, shape):
    """The layer's values and 32-bit-padded mask rows give exactly pack_bitmask(S): cut to whole bytes when
    cols % 8 == 0, repacked otherwise; a stored exact zero is refused (pack_bitmask would drop it)."""
    from export.formats import bitmask_from_layer

    S = _sparse(shape, 0.4, dtype, seed=shape[1])
    layer = SparseLowRankLinear.from_factors(S, torch.zeros(shape[0], 0), torch.zeros(0, shape[1]), dtype=dtype)
    values, mask = bitmask_from_layer(layer.values, layer.mask, shape)
    ref_values, ref_mask = pack_bitmask(S)
    assert values.dtype == dtype and torch.equal(values, ref_values)
    assert mask.dtype == torch.uint8 and bytes(mask.numpy()) == bytes(ref_mask.numpy())
    if layer.nnz:
        with torch.no_grad():
            layer.values[0] = 0.0
        assert bitmask_from_layer(layer.values, layer.mask, shape) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_export_takes_the_layer_tensors_and_writes_the_same_bytes(tmp_path, monkeypatch, dtype):
    """The export's S tensors come from the layers (pack_bitmask is not called for them) and the file holds
    byte for byte the tensors and header that packing the dense S writes; a layer holding an exact zero
    value is packed from S."""
    import export.formats as formats
    from export.exporter import plain_state_dict
    from export.formats import write_encoded

    model = _oats_tiny(dtype=dtype)
    layers = list(compressed_layers(model).values())
    with torch.no_grad():
        layers[1].values[3] = 0.0  # stored, but zero: this layer falls back to packing S
    state, factors = plain_state_dict(model, merge=False)
    write_encoded(state, tmp_path / "old", lowrank=factors, nm=None)  # the packing of the dense S
    packed = []
    real = formats.pack_bitmask
    monkeypatch.setattr(formats, "pack_bitmask", lambda w: packed.append(tuple(w.shape)) or real(w))
    export_model(model, tmp_path / "new", "bitmask", nm=None)
    assert len(packed) == 1  # only the layer with a stored zero was packed from S
    (old_header, old_data), (new_header, new_data) = (_safetensors_parts(tmp_path / d / WEIGHTS_NAME) for d in ("old", "new"))
    assert old_header == new_header and old_data == new_data


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data bytes): the header's metadata keys come out in no fixed order, the rest is exact."""
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), b[8 + n:]

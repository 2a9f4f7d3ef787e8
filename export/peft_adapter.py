"""The low-rank part of an OATS model as a PEFT LoRA adapter (written without importing peft).

For a layer ``y = x S^T + (x V^T) U^T``: ``lora_A.weight = V`` [r, in], ``lora_B.weight = U`` [out, r],
``lora_alpha = r`` (scaling alpha/r = 1), per-module ranks in ``rank_pattern``/``alpha_pattern``, and
``target_modules`` the factored layers (rank-0 layers are left out). Loading::

    base = AutoModelForCausalLM.from_pretrained(base_dir)        # S as the weights
    model = PeftModel.from_pretrained(base, adapter_dir)          # + U V, trainable with is_trainable=True
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(ranks: dict[str, int], base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json contents for modules ``{name: rank}`` (ranks > 0)."""
    ranks = {n: int(r) for n, r in ranks.items() if r > 0}
    if not ranks:
        raise ValueError("no layer has a low-rank part: nothing to put in a LoRA adapter")
    common = max(set(ranks.values()), key=list(ranks.values()).count)  # most frequent rank as the default
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": {n: r for n, r in ranks.items() if r != common},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != common},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def adapter_state_dict(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """PEFT's saved key names for ``{module name: (U [out, r], V [r, in])}`` (rank-0 modules skipped)."""
    out = {}
    for name, (U, V) in factors.items():
        if U.shape[1] == 0:
            continue
        out[f"base_model.model.{name}.lora_A.weight"] = V.detach().cpu().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = U.detach().cpu().contiguous()
    return out


def write_lora_adapter(factors: dict[str, tuple[Tensor, Tensor]], directory: str | Path,
                       base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``{module: (U, V)}``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = {n: U.shape[1] for n, (U, V) in factors.items()}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(lora_config(ranks, base_model_name_or_path), indent=1))
    save_file(adapter_state_dict(factors), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory

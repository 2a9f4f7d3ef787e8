"""All metrics of one (compressed) model, as the config asks: ``metrics.ppl.<dataset>`` (token perplexity),
``metrics.word_ppl.wikitext`` (lm_eval word perplexity), ``metrics.zero_shot.<task>`` (+ ``mean``, ``mmlu``)."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from data import eval_tokens
from eval.perplexity import perplexity

log = logging.getLogger(__name__)


def evaluate(model: nn.Module, tokenizer, cfg: Any, device: torch.device) -> dict[str, Any]:
    """Run every evaluation the config names on ``model`` (already on ``device``)."""
    metrics: dict[str, Any] = {"ppl": {}}
    for name in cfg.eval_datasets:
        tokens = eval_tokens(tokenizer, name, cfg.data_dir)
        ppl = perplexity(model, tokens, cfg.eval_seqlen, cfg.eval_max_windows, cfg.eval_batch_size, device)
        log.info("%s: perplexity on %s (seqlen %d) = %.3f", cfg.name, name, cfg.eval_seqlen, ppl)
        metrics["ppl"][name] = ppl
    if cfg.word_perplexity:
        from eval.word_perplexity import word_perplexity_metrics

        metrics["word_ppl"] = word_perplexity_metrics(model, tokenizer, cfg)
    if cfg.zero_shot_tasks:
        from eval.zero_shot import zero_shot_metrics

        with torch.no_grad():
            metrics.update(zero_shot_metrics(model, tokenizer, cfg))
    return metrics

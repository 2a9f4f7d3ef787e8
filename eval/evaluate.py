"""All metrics of one (compressed) model, as the config asks: ``metrics.ppl.<dataset>`` (token perplexity),
``metrics.word_ppl.wikitext`` (lm_eval word perplexity), ``metrics.zero_shot.<task>`` (+ ``mean``, ``mmlu``).

The caller says how to compute a token perplexity (on the model in memory, or streamed block by
block) and how to get the whole model for lm_eval; this module knows only the metrics.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def evaluate(cfg: Any, tokens_of: Callable[[str], Tensor], tokenizer: Any, token_perplexity: Callable[[Tensor], float],
             whole_model: Callable[[], nn.Module]) -> dict[str, Any]:
    """Every evaluation the config names. ``tokens_of(dataset)`` gives its test stream [1, N]."""
    metrics: dict[str, Any] = {"ppl": {}}
    for name in cfg.eval_datasets:
        ppl = token_perplexity(tokens_of(name))
        log.info("%s: perplexity on %s (seqlen %d) = %.3f", cfg.name, name, cfg.eval_seqlen, ppl)
        metrics["ppl"][name] = ppl
    if cfg.word_perplexity:
        from eval.word_perplexity import word_perplexity_metrics

        metrics["word_ppl"] = word_perplexity_metrics(whole_model(), tokenizer, cfg)
    if cfg.zero_shot_tasks:
        from eval.zero_shot import zero_shot_metrics

        with torch.no_grad():
            metrics.update(zero_shot_metrics(whole_model(), tokenizer, cfg))
    return metrics

"""Token perplexity, the Wanda/SparseGPT protocol: the test split's rows joined into one stream, cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), and
``exp(mean token NLL)`` over all predicted tokens of all windows."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def n_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = n_tokens // seqlen
    return min(n, max_windows) if max_windows else n


def windows_of(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """[n, seqlen] non-overlapping windows of ``tokens`` [1, N] (the tail shorter than a window dropped)."""
    n = n_windows(tokens.shape[1], seqlen, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.shape[1]} tokens are fewer than one window of eval_seqlen={seqlen}")
    return tokens[0, : n * seqlen].view(n, seqlen)


def nll_sum(logits: Tensor, batch: Tensor) -> tuple[float, int]:
    """(summed next-token NLL, tokens predicted) of one batch: logits [B, L, V] for ids [B, L]."""
    logits = logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(nll), batch[:, 1:].numel()


def perplexity_of(outputs: Iterable[tuple[Tensor, Any]]) -> float:
    """exp(mean token NLL) over (batch ids, model output with ``.logits``) pairs: the one NLL loop,
    for the in-memory model and for streamed (block by block) evaluation alike."""
    total_nll, total_tokens = 0.0, 0
    for batch, out in outputs:
        nll, n = nll_sum(out.logits, batch)
        total_nll += nll
        total_tokens += n
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> float:
    """Perplexity of ``model`` on ``tokens`` [1, N]. The model must already sit on ``device``."""
    windows = windows_of(tokens, seqlen, max_windows)

    def outputs():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", leave=False):
            batch = windows[start : start + batch_size].to(device)
            yield batch, model(input_ids=batch, use_cache=False)

    return perplexity_of(outputs())

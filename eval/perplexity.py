"""Token perplexity, the Wanda/SparseGPT protocol: the test split's rows joined into one stream, cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), and
``exp(mean token NLL)`` over all predicted tokens of all windows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def n_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = n_tokens // seqlen
    return min(n, max_windows) if max_windows else n


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
    n = n_windows(tokens.shape[1], seqlen, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.shape[1]} tokens are fewer than one window of eval_seqlen={seqlen}")
    windows = tokens[0, : n * seqlen].view(n, seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)

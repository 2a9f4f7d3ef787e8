"""Token streams: calibration windows and evaluation streams, with the samplers the papers use."""
from __future__ import annotations

import logging
import random

import torch
from torch import Tensor

from data.sources import C4_EVAL_DOCS, JOINERS, PER_DOCUMENT_SAMPLING, DataError, load_docs

log = logging.getLogger(__name__)


def _encode(tokenizer, text: str) -> Tensor:
    """1-D LongTensor of token ids (no truncation, special tokens as the tokenizer adds them)."""
    ids = tokenizer(text, return_tensors="pt", truncation=False, verbose=False).input_ids
    return ids[0]


def eval_tokens(tokenizer, name: str, data_dir: str | None = None) -> Tensor:
    """[1, N] token ids of the test split joined as Wanda/SparseGPT do ('\\n\\n' or ' ')."""
    docs = load_docs(name, "test", data_dir)
    if name == "c4":
        docs = docs[:C4_EVAL_DOCS]
    return _encode(tokenizer, JOINERS[name].join(docs)).unsqueeze(0)


def calibration_windows(
    tokenizer,
    name: str,
    nsamples: int,
    seqlen: int,
    sampler: str = "random_windows",
    seed: int = 0,
    data_dir: str | None = None,
) -> Tensor:
    """[nsamples, seqlen] calibration token ids from ``name``'s train split.

    random_windows: Wanda/SparseGPT. Python ``random`` seeded with ``seed``; for C4 a random document
        longer than ``seqlen`` and a random window inside it, for the others a random window of the
        joined train stream.
    concat_docs: OATS/SliceGPT. Documents in order, joined and cut into consecutive ``seqlen`` windows;
        ``nsamples`` of them chosen by a seeded permutation (kept in corpus order).
    """
    docs = load_docs(name, "train", data_dir)
    rng = random.Random(seed)
    if sampler == "random_windows" and name in PER_DOCUMENT_SAMPLING:
        out = []
        tries = 0
        while len(out) < nsamples:
            tries += 1
            if tries > 100 * nsamples:
                raise DataError(f"{name}: found no document longer than cal_seqlen={seqlen} tokens; lower cal_seqlen")
            ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() <= seqlen:
                continue
            i = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[i : i + seqlen])
        return torch.stack(out)
    stream = _encode(tokenizer, JOINERS[name].join(docs))
    if stream.numel() <= seqlen:
        raise DataError(f"{name} train split has {stream.numel()} tokens, not more than cal_seqlen={seqlen}")
    if sampler == "random_windows":
        starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([stream[i : i + seqlen] for i in starts])
    if sampler == "concat_docs":
        n_windows = stream.numel() // seqlen
        if n_windows < nsamples:
            raise DataError(
                f"{name}: only {n_windows} consecutive windows of {seqlen} tokens, fewer than cal_nsamples={nsamples}"
            )
        chosen = sorted(rng.sample(range(n_windows), nsamples))
        return torch.stack([stream[i * seqlen : (i + 1) * seqlen] for i in chosen])
    raise DataError(f"calibration sampler {sampler!r}; allowed: 'random_windows', 'concat_docs'")


def mix_counts(nsamples: int, shares: list[float]) -> list[int]:
    """How many of ``nsamples`` windows each source of a mix gives, in proportion to ``shares`` (summing
    to 1): each gets the whole part of ``nsamples * share``, and the windows left over go one each to
    the largest remainders (the earlier source on a tie). Sums to ``nsamples``; no randomness."""
    exact = [nsamples * s for s in shares]
    counts = [int(x) for x in exact]
    left = nsamples - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts

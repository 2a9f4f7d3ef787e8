"""Calibration text sampled from the dense model itself (``cal_dataset: self_generated``): no corpus, so
no limit on how many windows a run may ask for.

Each window starts from the tokenizer's BOS token (when it has one) followed by a first token drawn
uniformly from the vocabulary's ordinary tokens (special tokens excluded): the prompt of LLM-QAT's
data-free generation (Liu et al. 2023); the "self-calibration" of Williams et al. likewise calibrates
pruning and quantization with text the model wrote. The rest is sampled with ``temperature`` and
nucleus ``top_p``. Unlike LLM-QAT, the first few tokens are not picked greedily, and an end-of-sequence
token does not stop a window (sampling goes on past it, as corpus windows run across document
boundaries). Every window is exactly ``length`` tokens, prompt included: what the model read as it
wrote the window.

Randomness is per window: window ``i`` draws its first token and one uniform number per sampled
position from a generator seeded with ``(seed, i)``, and each token is the inverse-CDF pick of that
number in the filtered distribution. So a window is the same whatever the batch size, and the first
``k`` windows of a bigger request are the ``k`` windows of a smaller one (up to rounding differences
between batch shapes).

Windows are generated once per cache key (model, dtype, seed, temperature, top_p, count, length) and
kept under ``cache_dir('self_generated')``, written atomically; the cached copy also holds the
fingerprint the record keeps, including a hash of the dense weights it came from (a cached copy whose
model's weights changed is generated again) and of the tokens. A request for more windows than a cached
one of the same model, weights, seed, sampling and length begins with that one's windows: they are read
back and only the rest is sampled (the cached count a whole number of batches, so every new batch holds
the windows a fresh run's would), and the fingerprint names the key it extends. A request for fewer
windows than a cached one, a whole number of batches, is the cached one's first windows (fingerprint
``slice_of``), with nothing sampled. A file in the cache folder that cannot be read as a set of windows
is ignored with a warning (a set of its key is sampled again and written over it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from data.files import atomic_write, cache_dir

log = logging.getLogger(__name__)

SELF_GENERATED = "self_generated"
PROMPT = "bos+uniform_first_token"
FORMAT = 1  # bump when what a key produces changes: older cached windows are then never read


def cache_key(model_id: str, dtype: str, seed: int, temperature: float, top_p: float, count: int, length: int) -> str:
    """16 hex digits naming the windows a config asks for (the config alone decides it, so a resumed run
    and the runner's staleness check find them without the model)."""
    blob = json.dumps({"model": model_id, "dtype": dtype, "seed": int(seed), "temperature": float(temperature),
                       "top_p": float(top_p), "count": int(count), "length": int(length), "prompt": PROMPT,
                       "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(key: str) -> Path:
    return cache_dir(SELF_GENERATED, f"{key}.pt")


def cached_fingerprint(key: str) -> dict[str, Any] | None:
    """The fingerprint of the cached windows of ``key``, or None when there are none."""
    path = cache_path(key)
    if not path.is_file():
        return None
    return dict(torch.load(path, weights_only=True)["fingerprint"])


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap hash of a model's weights: each tensor's name, shape and sum of absolute values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.float().abs().sum(dtype=torch.float64)):.10e}".encode())
    return h.hexdigest()[:16]


def tokens_hash(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def window_generator(seed: int, i: int) -> torch.Generator:
    """Window ``i``'s own random stream (CPU), seeded from ``(seed, i)``."""
    derived = int.from_bytes(hashlib.sha256(f"{int(seed)}:{int(i)}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(derived)


def ordinary_tokens(tokenizer: Any, vocab: int) -> Tensor:
    """Ids below ``vocab`` that the tokenizer knows and that are not special tokens (what a first token is drawn from)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(vocab, len(tokenizer))) if i not in special]
    if not ids:
        raise ValueError("cal_dataset 'self_generated': the tokenizer has no ordinary token to start a window from")
    return torch.tensor(ids)


def pick(logits: Tensor, u: Tensor, temperature: float, top_p: float) -> Tensor:
    """Logits [B, V] and uniforms u [B] in [0, 1) -> token ids [B]: the inverse-CDF pick of ``u`` in
    softmax(logits / temperature) cut to its nucleus (the most probable tokens whose mass reaches
    ``top_p``; the most probable one always kept) and renormalised. Ties sort by token id."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the more probable tokens
    kept = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept[:, 0] = sorted_p[:, 0]
    cdf = torch.cumsum(kept, dim=-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    # a zero-mass token after the nucleus can only be reached by rounding: fall back to the last kept one
    idx = torch.minimum(idx, (kept > 0).sum(dim=1, keepdim=True) - 1)
    return order.gather(1, idx).squeeze(1)


@torch.no_grad()
def sample_batch(model: nn.Module, prompts: Tensor, uniforms: Tensor, temperature: float, top_p: float,
                 device: torch.device, vocab: int, progress: Any = None) -> Tensor:
    """Prompts [B, p] continued to [B, p + uniforms.shape[1]] token ids, one token per uniform, with the
    model's KV cache (one forward over the prompt, then one token per step). Logits past ``vocab`` (an
    embedding padded beyond the tokenizer) are never sampled."""
    steps = uniforms.shape[1]
    out_tokens = [prompts]
    out = model(input_ids=prompts.to(device), use_cache=True)
    for t in range(steps):
        logits = out.logits[:, -1, :vocab].float().cpu()
        nxt = pick(logits, uniforms[:, t], temperature, top_p).unsqueeze(1)
        out_tokens.append(nxt)
        if progress is not None:
            progress.update(nxt.shape[0])
        if t + 1 < steps:
            out = model(input_ids=nxt.to(device), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(out_tokens, dim=1)


def self_generated_windows(model: nn.Module, tokenizer: Any, model_id: str, dtype: str, count: int, length: int, seed: int,
                           temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8,
                           device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Any]]:
    """([count, length] token ids sampled from ``model``, their fingerprint for the record), from the
    cache when this key was generated before from the same weights, else generated now (``batch_size``
    windows at a time on ``device``; the model is put back where it was) and cached atomically.
    Call it on the dense model."""
    if not getattr(model, "can_generate", lambda: False)():
        raise ValueError(f"cal_dataset 'self_generated': model {model_id!r} ({type(model).__name__}) cannot generate text")
    key = cache_key(model_id, dtype, seed, temperature, top_p, count, length)
    path = cache_path(key)
    weights = weights_fingerprint(model)
    cached = _read(path) if path.is_file() else None
    if cached is not None:
        if cached["fingerprint"].get("weights") == weights:
            log.info("self-generated calibration text: %d windows of %d tokens from %s (key %s)", count, length, path, key)
            return cached["tokens"], dict(cached["fingerprint"])
        log.warning("self-generated calibration text at %s came from other weights of %r; generating it again", path, model_id)
    sets = cached_sets(model_id, dtype, seed, temperature, top_p, length, weights, skip=key)
    longer = next((s for s in sets if s.count > count), None) if count % batch_size == 0 else None
    if longer is not None:
        log.info("self-generated calibration text: the first %d of the %d windows at %s", count, longer.count,
                 cache_path(longer.key))
        tokens = longer.tokens[:count].clone()
        fingerprint = {**_fingerprint(key, model_id, dtype, weights, seed, temperature, top_p, tokens,
                                      longer.fingerprint.get("generated_on", "?"), 0.0),
                       "slice_of": {"key": longer.key, "count": longer.count}}
    else:
        prefix = next((s for s in reversed(sets) if s.count < count and s.count % batch_size == 0), None)
        start = 0 if prefix is None else prefix.count
        if prefix is not None:
            log.info("self-generated calibration text: the first %d of %d windows from %s (key %s)", start, count,
                     cache_path(prefix.key), prefix.key)
        tokens, seconds, where = _generate(model, tokenizer, count, length, seed, temperature, top_p, batch_size,
                                           torch.device(device), start)
        if prefix is not None:
            tokens = torch.cat([prefix.tokens, tokens])
        fingerprint = _fingerprint(key, model_id, dtype, weights, seed, temperature, top_p, tokens, where, seconds)
        if prefix is not None:
            fingerprint["extends"] = {"key": prefix.key, "count": start}
    atomic_write(path, lambda tmp: torch.save({"tokens": tokens, "fingerprint": fingerprint}, tmp))
    log.info("self-generated calibration text cached at %s (key %s, tokens sha256 %s)", path, key, fingerprint["sha256"])
    return tokens, fingerprint


def _fingerprint(key: str, model_id: str, dtype: str, weights: str, seed: int, temperature: float, top_p: float,
                 tokens: Tensor, where: str, seconds: float) -> dict[str, Any]:
    return {"key": key, "model": model_id, "dtype": dtype, "weights": weights, "seed": int(seed),
            "temperature": float(temperature), "top_p": float(top_p), "count": int(tokens.shape[0]),
            "length": int(tokens.shape[1]), "prompt": PROMPT, "sha256": tokens_hash(tokens), "generated_on": where,
            "seconds": round(seconds, 3)}


class CachedSet(NamedTuple):
    """One cached set of windows: how many, the [count, length] token ids, its key, its fingerprint."""

    count: int
    tokens: Tensor
    key: str
    fingerprint: dict[str, Any]


def cached_sets(model_id: str, dtype: str, seed: int, temperature: float, top_p: float, length: int,
                weights: str, skip: str | None = None) -> list[CachedSet]:
    """Every readable cached set of this model, dtype, weights, seed, sampling and window length, whatever
    its count, by count: a request's windows begin a bigger set's and a smaller set's begin the request's.
    A set's count is its tokens' row count, and its file must sit under the key of that count; the file
    under ``skip`` (the request's own key, already read) is not read again."""
    sets = []
    for path in sorted(cache_dir(SELF_GENERATED).glob("*.pt")):
        if path.stem == skip:
            continue
        cached = _read(path)
        if cached is None:
            continue
        fp, tokens = cached["fingerprint"], cached["tokens"]
        if tokens.dim() != 2 or tokens.shape[1] != length:
            continue
        c = int(tokens.shape[0])
        if fp.get("weights") == weights and path.stem == cache_key(model_id, dtype, seed, temperature, top_p, c, length):
            sets.append(CachedSet(c, tokens, path.stem, dict(fp)))
    return sorted(sets, key=lambda s: s.count)


def _read(path: Path) -> dict[str, Any] | None:
    """A cached file's {"tokens", "fingerprint"}, or None (with a warning) when it cannot be read as one:
    it is then treated as absent, and a set of its key is sampled and written over it."""
    try:
        cached = torch.load(path, weights_only=True)
        if isinstance(cached, dict) and isinstance(cached.get("tokens"), Tensor) and isinstance(cached.get("fingerprint"), dict):
            return cached
    except Exception as e:  # a foreign or half-written file in the cache folder is skipped, never fatal
        log.warning("self-generated calibration text: cannot read %s (%s: %s); ignoring it", path, type(e).__name__, e)
        return None
    log.warning("self-generated calibration text: %s is not a cached set of windows; ignoring it", path)
    return None


def _generate(model: nn.Module, tokenizer: Any, count: int, length: int, seed: int, temperature: float, top_p: float,
              batch_size: int, device: torch.device, start: int = 0) -> tuple[Tensor, float, str]:
    """Windows ``start`` to ``count`` - 1 ([count - start, length]), the seconds they took, the device."""
    from tqdm.auto import tqdm

    vocab = int(model.get_output_embeddings().weight.shape[0])
    first_tokens = ordinary_tokens(tokenizer, vocab)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt_len = 2 if bos is not None else 1
    if length <= prompt_len:
        raise ValueError(f"cal_seqlen {length}: a self-generated window needs more than its {prompt_len}-token prompt")
    prompts, uniforms = [], []
    for i in range(start, count):
        g = window_generator(seed, i)
        first = first_tokens[torch.randint(len(first_tokens), (1,), generator=g)]
        prompts.append(torch.cat([torch.tensor([bos]), first]) if bos is not None else first)
        uniforms.append(torch.rand(length - prompt_len, generator=g, dtype=torch.float64))
    prompts_t, uniforms_t = torch.stack(prompts).long(), torch.stack(uniforms)
    home = next(model.parameters()).device
    was_training = model.training
    log.info("self-generating calibration text: windows %d-%d of %d tokens, batches of %d on %s (temperature %g, top_p %g, seed %d)",
             start, count - 1, length, batch_size, device, temperature, top_p, seed)
    t0 = time.perf_counter()
    model.eval().to(device)
    parts = []
    try:
        with tqdm(total=(count - start) * (length - prompt_len), desc="self-generating calibration text", unit="tok",
                  leave=False) as bar:
            for s in range(0, count - start, batch_size):
                parts.append(sample_batch(model, prompts_t[s : s + batch_size], uniforms_t[s : s + batch_size], temperature,
                                          top_p, device, min(len(tokenizer), vocab), bar))
    finally:
        model.to(home).train(was_training)
    seconds = time.perf_counter() - t0
    tokens = torch.cat(parts)
    log.info("self-generated %d tokens in %.1f s (%.0f tokens/s); window %d begins %r", tokens.numel(), seconds,
             (count - start) * (length - prompt_len) / max(seconds, 1e-9), start, tokenizer.decode(tokens[0, :32]))
    return tokens, seconds, str(device)

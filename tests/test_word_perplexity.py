"""lm_eval `wikitext` word perplexity: the document-level rebuild and the rolling-window number."""
from __future__ import annotations

import math
import os
import re

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from eval import word_perplexity as wp  # noqa: E402

ROWS = [
    "",
    " = First Article = \n",
    "",
    " The first article is here , with a comma . \n",
    "",
    " = = A section = = \n",
    "",
    " More text ( in brackets ) about 1 @,@ 000 things . \n",
    "",
    " = Second Article = \n",
    "",
    " Short \" quoted \" text . \n",
]


def test_documents_split_at_top_level_headings_only():
    docs = wp.wikitext_documents(ROWS)
    assert docs == [
        " = First Article = \n \n The first article is here , with a comma . \n \n = = A section = = \n \n"
        " More text ( in brackets ) about 1 @,@ 000 things . \n \n",
        " = Second Article = \n \n Short \" quoted \" text . \n",
    ]
    assert wp.wikitext_documents(ROWS, blank="\n")[1] == " = Second Article = \n\n Short \" quoted \" text . \n"
    assert wp.is_top_heading(" = Valkyria Chronicles III = \n")
    assert not wp.is_top_heading(" = = Gameplay = = \n") and not wp.is_top_heading(" = = = Plot = = = \n")
    assert wp.word_count(docs[1]) == 12  # 10 tokens + the empty strings at both edges, as lm_eval counts


def test_real_wikitext2_test_has_62_documents(shared_data):
    from data import load_docs

    rows = load_docs("wikitext2", "test", str(shared_data))
    docs = wp.wikitext_documents(rows)
    assert len(docs) == 62  # EleutherAI/wikitext_document_level wikitext-2-raw-v1 test
    assert docs[0].startswith(" = Robert Boulter = \n")
    assert all(wp.is_top_heading(d.split("\n", 1)[0]) for d in docs)
    first = next(i for i, r in enumerate(rows) if wp.is_top_heading(r))
    assert "".join(docs) == "".join(r if r.strip() else wp.RAW_BLANK for r in rows[first:])  # nothing lost


def _reference_word_ppl(model, tok, docs, max_length):
    """Independent float64 re-implementation of lm_eval's rolling loglikelihood + word perplexity."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total_ll, total_words = 0.0, 0
    for page in docs:
        ids = tok(wikitext_detokenizer({"page": page}), add_special_tokens=False).input_ids
        n, L = len(ids), max_length
        ends = [min(L, n)]
        while ends[-1] < n:
            ends.append(min(n, ends[-1] + L))
        for k, e in enumerate(ends):
            start = 0 if k == 0 else ends[k - 1]
            inp = [prefix] + ids[: e - 1] if k == 0 else ids[e - L - 1 : e - 1]  # each window holds L inputs at most
            assert len(inp) <= L
            with torch.no_grad():
                logp = model(torch.tensor([inp])).logits[0].double().log_softmax(-1)
            targets = torch.tensor(ids[start:e])
            total_ll += float(logp[-len(targets):].gather(1, targets[:, None]).sum())
        total_words += len(re.split(r"\s+", page))
    return math.exp(-total_ll / total_words)


def test_word_perplexity_matches_independent_rolling_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = wp.wikitext_documents(ROWS)
    docs.append(" = Third = \n \n " + " ".join(f"word{i} ," for i in range(40)) + " \n")  # several windows
    max_length = 16
    out = wp.word_perplexity(model, tok, docs, max_length=max_length, batch_size=1)
    assert out["documents"] == 3 and out["max_length"] == max_length
    ref = _reference_word_ppl(model, tok, docs, max_length)
    assert out["word_perplexity"] == pytest.approx(ref, rel=1e-5)
    # the window length matters: a longer one gives another number (so it is really used)
    ref64 = _reference_word_ppl(model, tok, docs, 64)
    assert abs(ref64 - ref) / ref > 1e-4

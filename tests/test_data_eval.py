"""Data sources, calibration samplers and token perplexity."""
import math

import pytest
import torch

from data import DataError, calibration_windows, eval_tokens, load_docs
from data.sources import JOINERS
from eval.perplexity import perplexity


def test_pydoc_split_fixed_and_disjoint():
    train, test = load_docs("pydoc", "train"), load_docs("pydoc", "test")
    assert len(test) >= 15 and len(train) >= 3 * len(test)
    assert not set(train) & set(test)
    assert load_docs("pydoc", "test") == test


def test_random_windows_seeded(smollm2):
    _, tok = smollm2
    a = calibration_windows(tok, "pydoc", 4, 64, "random_windows", seed=0)
    b = calibration_windows(tok, "pydoc", 4, 64, "random_windows", seed=0)
    c = calibration_windows(tok, "pydoc", 4, 64, "random_windows", seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_concat_docs_are_consecutive_slices(smollm2):
    _, tok = smollm2
    w = calibration_windows(tok, "pydoc", 5, 128, "concat_docs", seed=3)
    stream = tok(JOINERS["pydoc"].join(load_docs("pydoc", "train")), return_tensors="pt").input_ids[0]
    for row in w:
        starts = [i for i in range(0, stream.numel() - 127, 128) if torch.equal(stream[i : i + 128], row)]
        assert len(starts) == 1


def test_missing_local_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="config key 'data_dir'.*not a directory"):
        load_docs("wikitext2", "test", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="wikitext2 test split: none of"):
        load_docs("wikitext2", "test", str(tmp_path))


def test_local_wikitext_and_c4(shared_data, smollm2):
    _, tok = smollm2
    rows = load_docs("wikitext2", "test", str(shared_data))
    assert len(rows) == 4358 and rows[0] == "" and rows[1].startswith(" = Robert Boulter = ")
    c4_train, c4_test = load_docs("c4", "train", str(shared_data)), load_docs("c4", "test", str(shared_data))
    assert len(c4_train) == 200 and len(c4_test) == 100 and not set(c4_train) & set(c4_test)
    w = calibration_windows(tok, "c4", 3, 256, "random_windows", 0, str(shared_data))
    assert w.shape == (3, 256)
    assert eval_tokens(tok, "wikitext2", str(shared_data)).shape[1] > 250_000


def test_perplexity_matches_manual_nll():
    from tests.conftest import tiny_model

    model = tiny_model("llama", layers=1)
    tokens = torch.randint(4, 128, (1, 100))
    got = perplexity(model, tokens, seqlen=32, max_windows=2, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(2):
            w = tokens[:, 32 * k : 32 * (k + 1)]
            logp = torch.log_softmax(model(input_ids=w).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, w[0, 1:, None]).sum().item()
            n += 31
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert perplexity(model, tokens, seqlen=32) != got  # 3 windows, not 2

"""Calibration text without a data limit: windows sampled from the dense model (``self_generated``),
seeded and cached, and mixes of sources with shares; bad values fail in one line before any model loads."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from ml_collections import ConfigDict

import main
from data.self_generated import (SELF_GENERATED, cache_path, pick, self_generated_windows, tokens_hash,
                                 window_generator)
from data.tokens import mix_counts
from oats.config import ConfigError, cal_sources, config_hash, legacy_config_hash, resolve
from tests.conftest import config_error, preflight_models_cannot_generate, tiny_model


class TinyTokenizer:
    """The tokenizer surface generation reads, for the 128-token tiny models: ids 0-2 are special, 1 is BOS."""

    all_special_ids = [0, 1, 2]
    bos_token_id = 1

    def __len__(self) -> int:
        return 128

    def decode(self, ids) -> str:
        return " ".join(map(str, ids.tolist()))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def generate(model, count=4, length=10, seed=0, **kw):
    return self_generated_windows(model, TinyTokenizer(), "tiny", "float32", count, length, seed, **kw)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- sampling ------------------------------------------------------------------------------------------

def test_pick_is_the_inverse_cdf_of_the_nucleus():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    # full distribution, sorted: token 1 (0.6), 2 (0.3), 0 (0.1)
    assert [int(pick(logits, torch.tensor([u]), 1.0, 1.0)) for u in (0.0, 0.59, 0.61, 0.89, 0.91, 0.999)] == [1, 1, 2, 2, 0, 0]
    # top_p 0.7 keeps tokens 1 and 2 (0.6 < 0.7), renormalised to 2/3 and 1/3
    assert [int(pick(logits, torch.tensor([u]), 1.0, 0.7)) for u in (0.6, 0.7, 0.999)] == [1, 2, 2]
    # top_p at most the largest mass keeps the most probable token only
    assert int(pick(logits, torch.tensor([0.999]), 1.0, 0.5)) == 1
    # a low temperature sharpens towards the argmax
    assert int(pick(logits, torch.tensor([0.95]), 0.05, 1.0)) == 1


def test_windows_are_what_the_model_samples_with_its_kv_cache(cache):
    """Every token is the pick, at its window's own uniform, of the logits a full (uncached) forward gives."""
    model = tiny_model()
    tokens, _ = generate(model, count=3, length=12, seed=5, temperature=0.8, top_p=0.9, batch_size=2)
    assert tokens.shape == (3, 12) and (tokens[:, 0] == 1).all() and not torch.isin(tokens[:, 1], torch.tensor([0, 1, 2])).any()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    for i in range(3):
        g = window_generator(5, i)
        torch.randint(125, (1,), generator=g)  # the first token's draw
        u = torch.rand(10, generator=g, dtype=torch.float64)
        expected = [int(pick(logits[i, j - 1 : j], u[j - 2 : j - 1], 0.8, 0.9)) for j in range(2, 12)]
        assert tokens[i, 2:].tolist() == expected


def test_deterministic_per_seed_and_cached(cache):
    model = tiny_model()
    calls = count_forwards(model)
    first, fp = generate(model, count=5, length=10, seed=0, batch_size=2)
    assert calls[0] == 3 * 8  # 3 batches of 8 new tokens: the prompt's forward, then one per new token but the last
    assert fp["sha256"] == tokens_hash(first) and {k: fp[k] for k in ("model", "seed", "temperature", "top_p", "count", "length")} == {
        "model": "tiny", "seed": 0, "temperature": 1.0, "top_p": 1.0, "count": 5, "length": 10}
    assert cache_path(fp["key"]).is_file()

    again, fp_again = generate(model, count=5, length=10, seed=0, batch_size=2)
    assert calls[0] == 3 * 8 and torch.equal(again, first) and fp_again == fp  # from the cache: the model did not run

    other, fp_other = generate(model, count=5, length=10, seed=1, batch_size=2)
    assert not torch.equal(other, first) and fp_other["key"] != fp["key"] and calls[0] > 3 * 8

    cache_path(fp["key"]).unlink()
    rebatched, _ = generate(model, count=5, length=10, seed=0, batch_size=5)  # the batch size changes no window
    assert torch.equal(rebatched, first)


def test_a_bigger_request_extends_a_cached_smaller_one(cache):
    """The largest cached whole number of batches is read back, only the rest is sampled, and the windows
    are a fresh run's, bit for bit."""
    model = tiny_model()
    fresh, fp_fresh = generate(model, count=7, length=10, seed=3, batch_size=2)
    cache_path(fp_fresh["key"]).unlink()
    _, fp_four = generate(model, count=4, length=10, seed=3, batch_size=2)
    _, fp_five = generate(model, count=5, length=10, seed=3, batch_size=2)  # 5 windows are not whole batches: never read back as a prefix
    assert fp_five["extends"] == {"key": fp_four["key"], "count": 4}
    calls = count_forwards(model)
    extended, fp = generate(model, count=7, length=10, seed=3, batch_size=2)
    assert calls[0] == 2 * 8  # windows 4-6 only: two batches
    assert torch.equal(extended, fresh) and fp["sha256"] == fp_fresh["sha256"] and "extends" not in fp_fresh
    assert fp["extends"] == {"key": fp_four["key"], "count": 4} and fp["key"] == fp_fresh["key"]
    _, fp_other_seed = generate(model, count=7, length=10, seed=4, batch_size=2)
    _, fp_longer = generate(model, count=7, length=12, seed=3, batch_size=2)
    assert "extends" not in fp_other_seed and "extends" not in fp_longer
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    _, fp_new_weights = generate(model, count=9, length=10, seed=3, batch_size=2)
    assert "extends" not in fp_new_weights


def test_a_smaller_request_is_the_first_windows_of_a_cached_bigger_one(cache):
    """A whole number of batches is read from the smallest bigger cached set, nothing sampled, and it is a
    fresh run's windows bit for bit; a part batch, another seed or other weights are sampled."""
    model = tiny_model()
    fresh, fp_fresh = generate(model, count=4, length=10, seed=3, batch_size=2)
    cache_path(fp_fresh["key"]).unlink()
    _, fp_eight = generate(model, count=8, length=10, seed=3, batch_size=2)
    _, fp_six = generate(model, count=6, length=10, seed=3, batch_size=2)
    assert fp_six["slice_of"] == {"key": fp_eight["key"], "count": 8}
    calls = count_forwards(model)
    sliced, fp = generate(model, count=4, length=10, seed=3, batch_size=2)
    assert calls[0] == 0 and torch.equal(sliced, fresh)
    assert fp["slice_of"] == {"key": fp_six["key"], "count": 6}  # the smallest bigger one
    assert fp["key"] == fp_fresh["key"] and fp["sha256"] == fp_fresh["sha256"] and fp["count"] == 4 and fp["seconds"] == 0.0
    assert cache_path(fp["key"]).is_file()  # cached under its own key: the next request reads it directly
    _, fp_part = generate(model, count=3, length=10, seed=3, batch_size=2)
    assert calls[0] > 0 and "slice_of" not in fp_part
    calls[0] = 0
    _, fp_other_seed = generate(model, count=4, length=10, seed=4, batch_size=2)
    assert calls[0] > 0 and "slice_of" not in fp_other_seed
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    _, fp_new_weights = generate(model, count=2, length=10, seed=3, batch_size=2)
    assert "slice_of" not in fp_new_weights


def test_cached_windows_of_other_weights_are_generated_again(cache):
    model = tiny_model()
    first, fp = generate(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    calls = count_forwards(model)
    second, fp2 = generate(model)
    assert calls[0] > 0 and fp2["weights"] != fp["weights"] and fp2["key"] == fp["key"]


def test_an_unreadable_cached_file_is_ignored_with_a_warning(cache, caplog):
    """A corrupt file under a request's own key, under a smaller set's key and a foreign file beside them
    break nothing: each is named in a warning, the windows are a fresh run's, and the request's file is
    written again; a smaller set read back as a prefix would have been one batch fewer to sample."""
    model = tiny_model()
    fresh, fp = generate(model, count=6, length=10, seed=2, batch_size=2)
    _, fp_four = generate(model, count=4, length=10, seed=2, batch_size=2)
    cache_path(fp["key"]).write_bytes(b"not a torch file")
    cache_path(fp_four["key"]).write_bytes(b"half a fi")
    (cache / "self_generated" / "foreign.pt").parent.mkdir(parents=True, exist_ok=True)
    torch.save([1, 2, 3], cache / "self_generated" / "foreign.pt")
    calls = count_forwards(model)
    with caplog.at_level("WARNING", logger="data.self_generated"):
        again, fp_again = generate(model, count=6, length=10, seed=2, batch_size=2)
    assert torch.equal(again, fresh) and fp_again["sha256"] == fp["sha256"] and "extends" not in fp_again
    assert calls[0] == 3 * 8  # all three batches sampled: the corrupt 4-window set was not read as a prefix
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warned for name in (fp["key"], fp_four["key"], "foreign.pt"))
    assert sum(fp["key"] in r.getMessage() for r in caplog.records) == 1  # the own-key file is read once
    assert torch.equal(torch.load(cache_path(fp["key"]), weights_only=True)["tokens"], fresh)  # written over


def test_a_cached_set_counts_its_rows_not_its_fingerprint(cache):
    """A set's count is its tokens' row count: a fingerprint whose ``count`` is not a number (a hand-edited
    file) neither raises nor hides the set, and rows that disagree with the file's key keep it out."""
    model = tiny_model()
    fresh, fp_four = generate(model, count=4, length=10, seed=5, batch_size=2)
    cache_path(fp_four["key"]).unlink()
    _, fp_eight = generate(model, count=8, length=10, seed=5, batch_size=2)
    record = torch.load(cache_path(fp_eight["key"]), weights_only=True)
    torch.save({**record, "fingerprint": {**record["fingerprint"], "count": "eight"}}, cache_path(fp_eight["key"]))
    calls = count_forwards(model)
    sliced, fp = generate(model, count=4, length=10, seed=5, batch_size=2)
    assert calls[0] == 0 and torch.equal(sliced, fresh) and fp["slice_of"] == {"key": fp_eight["key"], "count": 8}
    cache_path(fp["key"]).unlink()
    torch.save({**record, "tokens": record["tokens"][:6]}, cache_path(fp_eight["key"]))  # 6 rows under the 8-key
    again, fp_again = generate(model, count=4, length=10, seed=5, batch_size=2)
    assert calls[0] > 0 and torch.equal(again, fresh) and "slice_of" not in fp_again


def test_the_cache_write_is_atomic(cache, monkeypatch):
    """A write that dies half way leaves no cached windows (nor a temporary file); the next call generates."""
    model = tiny_model()
    real_save = torch.save

    def dies_half_way(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        generate(model)
    assert not any(p.is_file() for p in cache.rglob("*"))
    monkeypatch.setattr(torch, "save", real_save)
    tokens, fp = generate(model)
    assert torch.equal(torch.load(cache_path(fp["key"]), weights_only=True)["tokens"], tokens)


# --- mixing ---------------------------------------------------------------------------------------------

def test_mix_counts_follow_the_shares():
    assert mix_counts(10, [0.75, 0.25]) == [8, 2]  # 7.5 / 2.5: the tie goes to the first source
    assert mix_counts(7, [1 / 3] * 3) == [3, 2, 2]
    assert mix_counts(128, [0.5, 0.3, 0.2]) == [64, 38, 26]
    assert mix_counts(100, [0.29, 0.71]) == [29, 71]
    assert all(sum(mix_counts(n, [0.1, 0.2, 0.7])) == n for n in range(1, 50))


def test_a_mix_gives_each_source_its_windows(tiny_model_dir, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import calibration_windows
    from oats.tasks import TextTask
    from oats.weights import InMemoryWeights

    cfg = resolve(ConfigDict(dict(model=str(tiny_model_dir), method="wanda", cal_dataset=["pydoc", SELF_GENERATED],
                                  cal_mix=[0.7, 0.3], cal_nsamples=5, cal_seqlen=16, cal_batch_size=4, seed=3)))
    assert cal_sources(cfg) == [("pydoc", 4), (SELF_GENERATED, 1)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    task = TextTask(cfg, InMemoryWeights(model), tok, torch.device("cpu"))
    ids = task.calibration_inputs()
    assert ids.shape == (5, 16)
    assert torch.equal(ids[:4], calibration_windows(tok, "pydoc", 4, 16, "random_windows", 3))
    assert ids[4, 0] == tok.bos_token_id and tokens_hash(ids[4:]) == task.generated["sha256"]
    record = task.calibration_record()
    assert record["windows"] == {"pydoc": 4, SELF_GENERATED: 1} and record[SELF_GENERATED]["count"] == 1

    resumed = TextTask(cfg, InMemoryWeights(model), tok, torch.device("cpu"))  # a resumed run reads the cached fingerprint
    assert resumed.calibration_record() == record
    assert resolve(ConfigDict(dict(cfg.to_dict(), cal_mix=None))).cal_mix is None
    assert cal_sources(resolve(ConfigDict(dict(cfg.to_dict(), cal_mix=None)))) == [("pydoc", 3), (SELF_GENERATED, 2)]


def test_a_mixed_run_records_its_sources(tiny_model_dir, cache, tmp_path):
    f = tmp_path / "mix.py"
    f.write_text(textwrap.dedent(f"""
        from ml_collections import ConfigDict
        CONFIGS = [ConfigDict(dict(name="mix", model={str(tiny_model_dir)!r}, method="wanda", cal_dataset=["pydoc", "self_generated"],
                                   cal_mix=[0.5, 0.5], cal_nsamples=4, cal_seqlen=16, cal_batch_size=2, cal_top_p=0.9,
                                   eval_seqlen=64, eval_max_windows=1))]
    """))
    out = tmp_path / "out"
    assert main.main(["--config", str(f), "--out", str(out)]) == 0
    rec = json.loads((out / "mix" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["calibration"]["windows"] == {"pydoc": 2, SELF_GENERATED: 2}
    fp = rec["calibration"][SELF_GENERATED]
    assert fp["top_p"] == 0.9 and fp["count"] == 2 and fp["length"] == 16 and cache_path(fp["key"]).is_file()
    assert set(rec["data"]) == {"cal:pydoc", "eval:pydoc"}
    from oats.config import resolve_all
    from oats.sweep import status_of

    assert status_of(resolve_all([ConfigDict(rec["config"])])[0], out) == "done"


# --- config keys, hashes and errors -----------------------------------------------------------------------

def test_existing_hashes_are_unchanged():
    """Hashes of experiments written before these keys existed (computed by the code before them)."""
    def h(**kw):
        c = resolve(ConfigDict(kw))
        return config_hash(c), legacy_config_hash(c)

    assert h(model="smollm2-135m") == ("66ef85c1f2907209", "a153a976c5afb852")
    assert h(model="smollm2-135m", method="wanda", cal_dataset="c4", cal_nsamples=16) == ("305332208162c921", "90e44319044d445f")
    assert h(model="smollm2-135m", method="oats", cal_dataset="wikitext2", seed=3) == ("43e5bb39f327b30f", "954690a4d5c74dff")
    assert h(model="dinov2-small-imgfocus", method="wanda", cal_dataset="photos") == ("b8e8373e8ce04dbd", "3469307a6ced9165")


def test_new_keys_are_hashed_where_they_apply():
    def c(**kw):
        return resolve(ConfigDict(dict(model="smollm2-135m", method="wanda", **kw)))

    gen = c(cal_dataset=SELF_GENERATED)
    assert gen.cal_temperature == 1.0 and gen.cal_top_p == 1.0 and "cal_mix" not in gen
    assert config_hash(gen) != config_hash(c(cal_dataset=SELF_GENERATED, cal_top_p=0.9))
    assert config_hash(gen) != config_hash(c(cal_dataset=SELF_GENERATED, cal_temperature=0.7))
    mix = c(cal_dataset=["c4", SELF_GENERATED], cal_mix=[0.5, 0.5])
    assert config_hash(mix) != config_hash(c(cal_dataset=["c4", SELF_GENERATED], cal_mix=[0.75, 0.25]))
    assert legacy_config_hash(mix) is None and "cal_temperature" not in c(cal_dataset="c4")


HEAD = "from ml_collections import ConfigDict\nB = dict(model='smollm2-135m', method='wanda', cal_nsamples=4, cal_seqlen=32, eval_seqlen=32, eval_max_windows=1)\n"

BAD = {
    "vision model": (dict(model="dinov2-small-imgfocus", cal_dataset=SELF_GENERATED), "config key 'cal_dataset': 'self_generated' samples calibration text from the model, and 'dinov2-small-imgfocus' is an image transformer"),
    "vision data in a mix": (dict(cal_dataset=["photos", SELF_GENERATED]), "config key 'cal_dataset': got ['photos', 'self_generated']; image data sets (photos) cannot be mixed"),
    "shares not summing to 1": (dict(cal_dataset=["c4", SELF_GENERATED], cal_mix=[0.5, 0.4]), "config key 'cal_mix': got [0.5, 0.4], which sums to 0.9; the shares must sum to 1"),
    "shares not matching the list": (dict(cal_dataset=["c4", SELF_GENERATED], cal_mix=[0.5, 0.25, 0.25]), "config key 'cal_mix': got 3 shares"),
    "a share of no window": (dict(cal_dataset=["c4", SELF_GENERATED], cal_mix=[0.9, 0.1]), "config key 'cal_mix': gives ['self_generated'] none of the cal_nsamples=4 windows"),
    "shares not numbers": (dict(cal_dataset=["c4", SELF_GENERATED], cal_mix=["0.5", "0.5"]), "config key 'cal_mix': got ['0.5', '0.5']; expected a list of numbers"),
    "shares without a list": (dict(cal_dataset="c4", cal_mix=[1.0]), "config key 'cal_mix': gives the shares of a mix: it applies only when cal_dataset is a list"),
    "unknown corpus in the list": (dict(cal_dataset=["c4", "wikitext3"]), "config key 'cal_dataset': unknown source(s) ['wikitext3'] in ['c4', 'wikitext3']; allowed values in a mix: 'pydoc', 'wikitext2', 'c4', 'ptb', 'self_generated'"),
    "a source twice": (dict(cal_dataset=["c4", "c4"]), "config key 'cal_dataset': names ['c4'] more than once"),
    "unknown single source": (dict(cal_dataset="self-generated"), "config key 'cal_dataset': got 'self-generated' (did you mean 'self_generated'?)"),
    "temperature 0": (dict(cal_dataset=SELF_GENERATED, cal_temperature=0.0), "config key 'cal_temperature': got 0.0; must be > 0"),
    "temperature negative": (dict(cal_dataset=SELF_GENERATED, cal_temperature=-1), "config key 'cal_temperature': got -1; must be > 0"),
    "top_p 0": (dict(cal_dataset=SELF_GENERATED, cal_top_p=0.0), "config key 'cal_top_p': got 0.0; must lie in (0.0, 1.0]"),
    "top_p above 1": (dict(cal_dataset=SELF_GENERATED, cal_top_p=1.2), "config key 'cal_top_p': got 1.2; must lie in (0.0, 1.0]"),
    "top_p without self_generated": (dict(cal_dataset="c4", cal_top_p=0.9), "config key 'cal_top_p': applies only when cal_dataset names 'self_generated'"),
    "lazy_load": (dict(cal_dataset=SELF_GENERATED, lazy_load=True), "config key 'cal_dataset': 'self_generated' samples text from the whole dense model in memory, which lazy_load never holds"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_calibration_config_fails_in_one_line_before_any_model_loads(case, tmp_path, capsys, no_model_loads):
    kw, message = BAD[case]
    err = config_error(tmp_path, capsys, HEAD + f"CONFIGS = [ConfigDict(dict(B, **{kw!r}))]\n")
    assert message in err, err


def test_a_local_image_transformer_is_refused_before_it_loads_and_when_it_runs(tmp_path):
    import transformers as T

    from oats.experiment import run_experiment
    from oats.preflight import preflight

    T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28,
                                 patch_size=7)).save_pretrained(tmp_path / "dino")
    cfg = resolve(ConfigDict(dict(model=str(tmp_path / "dino"), method="wanda", cal_dataset=["pydoc", SELF_GENERATED], device="cpu")))
    with pytest.raises(ConfigError, match="is an image transformer, which cannot generate text"):
        preflight([cfg], tmp_path / "out")
    with pytest.raises(ConfigError, match="is an image transformer, which cannot generate text"):
        run_experiment(cfg, tmp_path / "out" / "x")


def test_a_model_that_cannot_generate_is_refused_by_the_preflight(monkeypatch):
    from oats import preflight

    cfg = resolve(ConfigDict(dict(model="smollm2-135m", method="wanda", cal_dataset=SELF_GENERATED, cal_seqlen=32)))
    preflight.check_architecture(cfg)  # a causal LM can
    preflight_models_cannot_generate(monkeypatch)
    with pytest.raises(ConfigError, match="cannot generate"):
        preflight.check_architecture(cfg)


def test_generation_needs_a_model_that_generates(cache):
    class Encoder(torch.nn.Module):
        def can_generate(self) -> bool:
            return False

    with pytest.raises(ValueError, match="cannot generate"):
        generate(Encoder())


def test_smollm2_writes_text_it_finds_likely(smollm2, cache):
    """On the real model: its own samples are far likelier to it than tokens drawn uniformly."""
    model, tok = smollm2
    tokens, fp = self_generated_windows(model, tok, "smollm2-135m", "float32", 2, 24, 0, temperature=0.7, batch_size=2)
    assert tokens.shape == (2, 24) and (tokens[:, 0] == tok.bos_token_id).all() and fp["sha256"] == tokens_hash(tokens)
    random = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))

    def nll(ids):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, 1:-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).item()

    assert nll(tokens) < 0.5 * nll(random), (nll(tokens), nll(random), tok.decode(tokens[0]))

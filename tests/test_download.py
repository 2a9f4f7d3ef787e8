"""`python -m data.download` against a local stand-in for the hub: the files land where data.sources and
eval.zero_shot read them offline. No network: the hub loader is replaced by tiny in-memory data sets (and,
for C4, a local json.gz read through datasets' own json loader, as the hub's shard files are)."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from data import calibration_windows, eval_tokens, load_docs  # noqa: E402
from data import download as dl  # noqa: E402
from data.files import read_jsonl  # noqa: E402

WIKI = {
    "train": ["", " = Valkyria Chronicles III = \n", ""] + [f" Senjō no Valkyria {i} is a tactical role @-@ playing game .\n" for i in range(12)],
    "validation": ["", " = Homarus gammarus = \n", " Homarus gammarus is a large crustacean .\n"],
    "test": ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre actor .\n"],
}
PTB = {
    "train": [f"the <unk> company said N shares rose {i} cents" for i in range(10)],
    "validation": ["consumers may want to move their telephones a little closer to the tv set", "mr. <unk> is chairman"],
}
C4_DOCS = {
    "train": [f"C4 training document {i}. " * 8 for i in range(5)],
    "validation": [f"C4 validation document {i}, with some words. " * 3 for i in range(4)],
}
MMLU_SUBJ = ("abstract_algebra", "anatomy")
TASK_ROWS = {
    ("aps/super_glue", "boolq", "validation"): {
        "question": ["is the sky blue", "do fish fly"], "passage": ["Sky -- it is blue.", "Fish -- they swim."],
        "idx": [0, 1], "label": [1, 0]},
    ("aps/super_glue", "rte", "validation"): {
        "premise": ["A man is sleeping.", "It rains."], "hypothesis": ["A person rests.", "It is dry."],
        "idx": [0, 1], "label": [0, 1]},
    ("Rowan/hellaswag", None, "validation"): {
        "ind": [4, 5], "activity_label": ["Roof shingle removal", "Clean and jerk"],
        "ctx_a": ["A man is sitting on a roof.", "A lady walks to a barbell."],
        "ctx_b": ["he", "she"], "ctx": ["A man is sitting on a roof. he", "A lady walks to a barbell. she"],
        "endings": [["is using wrap.", "starts pulling.", "is ripping.", "holds a drink."],
                    ["lifts it.", "sits.", "bends [title] down.", "leaves."]],
        "source_id": ["activitynet~v_1", "activitynet~v_2"], "split": ["val", "val"],
        "split_type": ["indomain", "indomain"], "label": ["3", "0"]},
    ("allenai/winogrande", "winogrande_xl", "validation"): {
        "sentence": ["Sarah was a much better surgeon than Maria so _ always got the harder cases."],
        "option1": ["Sarah"], "option2": ["Maria"], "answer": ["1"]},
    ("allenai/ai2_arc", "ARC-Easy", "test"): {
        "id": ["Mercury_1"], "question": ["Which is a gas?"],
        "choices": [{"text": ["ice", "steam", "rock", "wood"], "label": ["A", "B", "C", "D"]}], "answerKey": ["B"]},
    ("allenai/ai2_arc", "ARC-Challenge", "test"): {
        "id": ["Mercury_2", "Mercury_3"], "question": ["Which is hot?", "Which is cold?"],
        "choices": [{"text": ["sun", "moon", "ice"], "label": ["1", "2", "3"]},
                    {"text": ["sun", "ice", "fire", "lava"], "label": ["A", "B", "C", "D"]}],
        "answerKey": ["1", "B"]},
    ("allenai/openbookqa", "main", "test"): {
        "id": ["7-980"], "question_stem": ["The sun is responsible for"],
        "choices": [{"text": ["puppies", "plants sprouting", "rain", "night"], "label": ["A", "B", "C", "D"]}],
        "answerKey": ["B"]},
    ("baber/piqa", None, "validation"): {
        "goal": ["How do I ready a guinea pig cage?"], "sol1": ["Use newspaper."], "sol2": ["Use glass."], "label": [0]},
    ("cais/mmlu", "all", "test"): {
        "question": ["q1", "q2", "q3"], "subject": ["abstract_algebra", "abstract_algebra", "anatomy"],
        "choices": [["a", "b", "c", "d"]] * 3, "answer": [0, 1, 2]},
    ("cais/mmlu", "all", "dev"): {
        "question": ["d1", "d2"], "subject": list(MMLU_SUBJ), "choices": [["a", "b", "c", "d"]] * 2, "answer": [3, 0]},
}


class FakeHub:
    """Stands in for ``datasets.load_dataset``: answers the ids data.download asks for, records each call,
    and fails like datasets >= 4 does on the script-only PTB id (so the fallback id is used)."""

    def __init__(self, c4_dir, fail: set[str] = frozenset()):
        self.calls: list[tuple] = []
        self.c4_dir = c4_dir
        self.fail = set(fail)

    def __call__(self, path, name=None, *, split, **kwargs):
        import datasets

        self.calls.append((path, name, split, tuple(sorted(kwargs))))
        if path in self.fail or (path, name, split) in self.fail:
            raise ConnectionError(f"hub unreachable for {path}")
        if path == "wikitext" and name == "wikitext-2-raw-v1":
            return datasets.Dataset.from_dict({"text": WIKI[split]})
        if path == "ptb_text_only":
            raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")
        if path == "ptb-text-only/ptb_text_only" and name == "penn_treebank":
            return datasets.Dataset.from_dict({"sentence": PTB[split]})
        if path == "allenai/c4":
            (key, shard), = kwargs["data_files"].items()
            assert key == split and shard == f"en/{dl.C4_SHARDS[split]}"
            # The hub shard is a json.gz file; datasets' json loader parses its ISO time stamps into datetimes.
            local = self.c4_dir / shard.replace("/", "_")
            local.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(local, "wt", encoding="utf-8") as f:
                for i, t in enumerate(C4_DOCS[split]):
                    f.write(json.dumps({"text": t, "timestamp": f"2019-04-2{i}T12:57:54Z", "url": f"https://x.org/{i}"}) + "\n")
            return datasets.load_dataset("json", data_files={split: str(local)}, split=split,
                                         cache_dir=str(self.c4_dir / "hf-cache"))
        if (path, name, split) in TASK_ROWS:
            return datasets.Dataset.from_dict(TASK_ROWS[(path, name, split)])
        raise FileNotFoundError(f"fake hub has no {path} {name} {split}")


class CharTokenizer:
    """The part of a HF tokenizer data.tokens uses: ``tok(text, return_tensors='pt', ...).input_ids``."""

    def __call__(self, text, return_tensors="pt", truncation=False, verbose=False):
        return SimpleNamespace(input_ids=torch.tensor([[1] + [ord(c) % 250 + 2 for c in text]]))


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("oats-data")
    hub = FakeHub(tmp_path_factory.mktemp("fake-hub"))
    lines: list[str] = []
    got = dl.download(root, load_dataset=hub, progress=False, echo=lines.append)
    return SimpleNamespace(root=got, hub=hub, lines=lines)


def test_layout_is_the_one_the_readers_use(downloaded):
    root = downloaded.root
    expected = {s.rel for s in dl.plan()}
    written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert written == expected
    assert {"wikitext2/wikitext-2-raw-v1/test.jsonl.gz", "c4/c4-train.00000-of-01024.json.gz",
            "c4/c4-validation.00000-of-00008.json.gz", "ptb/validation.jsonl.gz", "tasks/boolq/validation.jsonl.gz",
            "tasks/arc_easy/test.jsonl.gz", "tasks/mmlu/dev.jsonl.gz"} <= written
    # one progress line per file, then where to point data_dir
    assert len(downloaded.lines) == len(expected) + 1
    assert all(": " in ln and "rows from" in ln for ln in downloaded.lines[:-1])
    assert f"data_dir: {root}" in downloaded.lines[-1]
    # PTB: the script-only id failed, the next one was used
    assert ("ptb_text_only", "penn_treebank", "train", ()) in downloaded.hub.calls
    assert any(c[0] == "ptb-text-only/ptb_text_only" for c in downloaded.hub.calls)


def test_corpora_read_back_through_data_sources(downloaded):
    root = str(downloaded.root)
    assert load_docs("wikitext2", "test", data_dir=root) == WIKI["test"]
    assert load_docs("wikitext2", "train", data_dir=root) == WIKI["train"]
    assert read_jsonl(downloaded.root / "wikitext2/wikitext-2-raw-v1/validation.jsonl.gz", "text") == WIKI["validation"]
    assert load_docs("c4", "train", data_dir=root) == C4_DOCS["train"]
    assert load_docs("c4", "test", data_dir=root) == C4_DOCS["validation"]
    assert load_docs("ptb", "train", data_dir=root) == PTB["train"]
    assert load_docs("ptb", "test", data_dir=root) == PTB["validation"]  # SparseGPT: PTB test = validation
    # C4's datetime time stamps were written back as ISO strings, the other hub fields kept
    row = read_jsonl(downloaded.root / "c4" / dl.C4_SHARDS["train"])[0]
    assert set(row) == {"text", "timestamp", "url"} and row["timestamp"].startswith("2019-04-20")
    tok = CharTokenizer()
    for name in ("wikitext2", "c4", "ptb"):
        w = calibration_windows(tok, name, 3, 16, "random_windows", seed=0, data_dir=root)
        assert w.shape == (3, 16)
        assert eval_tokens(tok, name, data_dir=root).shape[0] == 1
    assert calibration_windows(tok, "wikitext2", 2, 32, "concat_docs", seed=0, data_dir=root).shape == (2, 32)


def test_zero_shot_local_configs_find_the_task_files(downloaded, tmp_path):
    pytest.importorskip("lm_eval")
    import datasets

    from eval import zero_shot as zs

    for name, spec in zs.TASK_SPECS.items():
        cfg = zs.local_task_config(name, downloaded.root)
        assert cfg["task"] == name  # hellaswag: the exact file, not the approximation
        files = cfg["dataset_kwargs"]["data_files"]
        assert files == {spec.split: str(downloaded.root / "tasks" / spec.local_dir / f"{spec.split}.jsonl.gz")}
        ds = datasets.load_dataset("json", data_files=files, split=spec.split, cache_dir=str(tmp_path / "hf"))
        hub_path, hub_name, _, fields = dl.TASK_HUB[name]
        assert ds.to_dict() == TASK_ROWS[(hub_path, hub_name, spec.split)]
        if cfg.get("process_docs"):  # lm_eval's own preprocessing runs on the downloaded fields
            docs = cfg["process_docs"](ds)
            assert len(docs) == len(ds)
    files = zs.mmlu_subject_files(downloaded.root, cache_dir=tmp_path / "mmlu")
    assert [r["question"] for r in read_jsonl(files["abstract_algebra"]["test"])] == ["q1", "q2"]
    assert [r["question"] for r in read_jsonl(files["anatomy"]["dev"])] == ["d2"]


def test_hub_ids_are_lm_evals_and_splits_are_zero_shots():
    pytest.importorskip("lm_eval")
    from eval import zero_shot as zs

    assert set(dl.TASK_HUB) == set(zs.TASK_SPECS) | {"mmlu"}
    for name, spec in zs.TASK_SPECS.items():
        stock = zs.stock_task_config(spec.stock_yaml)
        path, hub_name, splits, fields = dl.TASK_HUB[name]
        assert (path, hub_name) == (stock["dataset_path"], stock.get("dataset_name")), name
        assert splits == (spec.split,) and spec.local_dir == name
    mmlu = zs.stock_task_config("mmlu/default/mmlu_abstract_algebra.yaml")
    assert (mmlu["dataset_path"], mmlu["test_split"], mmlu["fewshot_split"]) == ("cais/mmlu", "test", "dev")
    assert dl.TASK_HUB["mmlu"][:3] == ("cais/mmlu", "all", ("test", "dev"))


def test_resume_skips_existing_files(tmp_path):
    hub = FakeHub(tmp_path / "hub")
    root = tmp_path / "d"
    dl.download(root, only=["wikitext2", "ptb"], load_dataset=hub, progress=False, echo=lambda s: None)
    (root / "wikitext2/wikitext-2-raw-v1/validation.jsonl.gz").unlink()
    hub.calls.clear()
    lines: list[str] = []
    dl.download(root, only=["wikitext2", "ptb"], load_dataset=hub, progress=False, echo=lines.append)
    assert hub.calls == [("wikitext", "wikitext-2-raw-v1", "validation", ())]
    assert sum("exists, skipped" in ln for ln in lines) == 4
    hub.calls.clear()
    dl.download(root, only=["ptb"], load_dataset=hub, overwrite=True, progress=False, echo=lambda s: None)
    assert len(hub.calls) == 4  # 2 splits x (failing script id + fallback)
    assert not [p for p in root.rglob("*.tmp")]


def test_a_failed_file_is_named_and_leaves_no_partial_file(tmp_path):
    hub = FakeHub(tmp_path / "hub", fail={("aps/super_glue", "rte", "validation")})
    root = tmp_path / "d"
    lines: list[str] = []
    with pytest.raises(dl.DownloadError, match=r"(?s)1 of 2 file\(s\) failed.*tasks/rte/validation.jsonl.gz"):
        dl.download(root, only=["tasks"], tasks=["boolq", "rte"], load_dataset=hub, progress=False, echo=lines.append)
    assert (root / "tasks/boolq/validation.jsonl.gz").is_file()
    assert not (root / "tasks/rte").exists() or not any((root / "tasks/rte").iterdir())
    assert any("FAILED" in ln and "rte" in ln for ln in lines)


def test_rows_missing_a_needed_field_are_refused(tmp_path):
    import datasets

    def hub(path, name=None, *, split, **kw):
        return datasets.Dataset.from_dict({"question": ["q"], "label": [1]})  # no `passage`

    with pytest.raises(dl.DownloadError, match="passage"):
        dl.download(tmp_path, only=["tasks"], tasks=["boolq"], load_dataset=hub, progress=False, echo=lambda s: None)
    assert not (tmp_path / "tasks/boolq/validation.jsonl.gz").exists()


def test_cli_only_and_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl, "hub_load_dataset", FakeHub(tmp_path / "hub"))
    assert dl.main(["--to", str(tmp_path / "d"), "--only", "tasks", "--tasks", "boolq,mmlu"]) == 0
    files = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.gz"))
    assert files == ["tasks/boolq/validation.jsonl.gz", "tasks/mmlu/dev.jsonl.gz", "tasks/mmlu/test.jsonl.gz"]
    assert f"data_dir: {(tmp_path / 'd').resolve()}" in capsys.readouterr().out
    assert dl.main(["--to", str(tmp_path / "d"), "--only", "tasks", "--tasks", "boolq,nope"]) == 1
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    assert dl.main(["--to", str(tmp_path / "e"), "--list"]) == 0
    assert "allenai/c4" in capsys.readouterr().out and not (tmp_path / "e").exists()


def test_same_rows_give_the_same_bytes(tmp_path):
    rows = [{"text": "a", "when": dt.datetime(2020, 1, 2, 3, 4, 5)}, {"text": "b", "when": None}]
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert dl._write_gzip_jsonl(a, rows, ("text",)) == 2
    dl._write_gzip_jsonl(b, rows, ("text",))
    assert a.read_bytes() == b.read_bytes()
    assert read_jsonl(a) == [{"text": "a", "when": "2020-01-02T03:04:05"}, {"text": "b", "when": None}]

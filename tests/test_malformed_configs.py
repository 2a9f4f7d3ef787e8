"""A table of malformed config files and command lines: each exits 2 with one line naming the key or the
file, before any model loads (tried as a hostile new user would)."""
from __future__ import annotations

import textwrap

import pytest

import main
from tests.conftest import config_error

HEAD = "from ml_collections import ConfigDict\nB = dict(model='smollm2-135m', cal_nsamples=2, cal_seqlen=32, eval_seqlen=32, eval_max_windows=1)\n"


def exp(**kw) -> str:
    return "ConfigDict(dict(B, " + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + "))"


def configs(*entries: str) -> str:
    return HEAD + "CONFIGS = [" + ", ".join(entries) + "]\n"


CASES = {
    # the file itself
    "syntax error": (HEAD + "CONFIGS = [ConfigDict(dict(B, method='wanda')]\n", "line 3: syntax error"),
    "name error": (HEAD + "CONFIGS = [ConfigDict(dict(B, method=wanda))]\n", "line 3: NameError"),
    "no CONFIGS": (HEAD + "EXPERIMENTS = []\n", "must define CONFIGS"),
    "CONFIGS a dict": (HEAD + "CONFIGS = {'a': 1}\n", "CONFIGS: must be a list"),
    "CONFIGS empty": (HEAD + "CONFIGS = []\n", "CONFIGS: is empty"),
    "None in CONFIGS": (configs(exp(method="wanda"), "None"), "CONFIGS[1] is NoneType"),
    "int in CONFIGS": (configs("3"), "CONFIGS[0] is int"),
    # names and paths
    "name ..": (configs(exp(name="..")), "'name'"),
    "name .": (configs(exp(name=".")), "'name'"),
    "name with slash": (configs(exp(name="a/b")), "'name'"),
    "name hidden": (configs(exp(name=".x")), "'name'"),
    "duplicate names": (configs(exp(name="x"), exp(name="x", method="wanda")), "names must be unique"),
    # keys and values
    "unknown key": (configs(exp(sparsty=0.5)), "did you mean 'sparsity'"),
    "method typo": (configs(exp(method="wnada")), "did you mean 'wanda'"),
    "sparsity 1.5": (configs(exp(method="wanda", sparsity=1.5)), "'sparsity'"),
    "sparsity nan": (HEAD + "CONFIGS = [ConfigDict(dict(B, method='wanda', sparsity=float('nan')))]\n", "'sparsity'"),
    "sparsity string": (configs(exp(method="wanda", sparsity="0.5")), "'sparsity'"),
    "rank_ratio on wanda": (configs(exp(method="wanda", rank_ratio=0.2)), "belongs to method 'oats'"),
    "compress on wanda": (configs(exp(method="wanda", compress=True)), "only to methods with a compress mode"),
    "blocksize on oats": (configs(exp(method="oats", blocksize=64)), "belongs to method 'sparsegpt'"),
    "gram_slr solver typo": (configs(exp(method="gram_slr", gram_slr_solver="fastest")), "'gram_slr_solver'"),
    "gram_slr inner_iters 0": (configs(exp(method="gram_slr", gram_slr_inner_iters=0)), "'gram_slr_inner_iters'"),
    "optima_tol inf": (HEAD + "CONFIGS = [ConfigDict(dict(B, method='wanda', weight_update='optima', optima_tol=float('inf')))]\n", "'optima_tol'"),
    "percdamp inf": (HEAD + "CONFIGS = [ConfigDict(dict(B, method='sparsegpt', percdamp=float('inf')))]\n", "'percdamp'"),
    "N:M ignores sparsity": (configs(exp(method="sparsegpt", sparsity_type="2:4", sparsity=0.7)), "removes exactly"),
    "N:M 4:4": (configs(exp(method="wanda", sparsity_type="4:4")), "'sparsity_type'"),
    "N:M spelled 2-4": (configs(exp(method="wanda", sparsity_type="2-4")), "'sparsity_type'"),
    "N:M not dividing widths": (configs(exp(method="wanda", sparsity_type="2:5")), "does not divide"),
    "OATS N:M over budget": (configs(exp(method="oats", sparsity_type="2:4", sparsity=0.6)), "'sparsity'"),
    "no metrics": (configs(exp(method="wanda", eval_datasets=[])), "'eval_datasets'"),
    "unknown eval data set": (configs(exp(eval_datasets=["wikitext3"])), "'eval_datasets'"),
    "unknown cal data set": (configs(exp(method="wanda", cal_dataset="imagenet")), "'cal_dataset'"),
    "cal_seqlen beyond positions": (configs(exp(method="wanda", cal_seqlen=100000)), "'cal_seqlen'"),
    "eval_seqlen beyond positions": (configs(exp(eval_seqlen=9000)), "'eval_seqlen'"),
    "seed beyond 64 bits": (configs(exp(seed=2**64)), "'seed'"),
    "seed negative": (configs(exp(seed=-1)), "'seed'"),
    "cal_nsamples 0": (configs(exp(method="wanda", cal_nsamples=0)), "'cal_nsamples'"),
    "cal_nsamples float": (configs(exp(method="wanda", cal_nsamples=2.5)), "'cal_nsamples'"),
    "dtype float8": (configs(exp(dtype="float8")), "'dtype'"),
    "device tpu": (configs(exp(device="tpu")), "'device'"),
    "threads 0": (configs(exp(threads=0)), "'threads'"),
    "owl on dense": (configs(exp(layerwise="owl")), "'layerwise'"),
    "owl with N:M": (configs(exp(method="wanda", layerwise="owl", sparsity_type="2:4")), "'layerwise'"),
    "owl band outside [0, 1)": (configs(exp(method="wanda", layerwise="owl", owl_lambda=0.6)), "'owl_lambda'"),
    "optima on dense": (configs(exp(weight_update="optima")), "'weight_update'"),
    "unknown update": (configs(exp(method="wanda", weight_update="obs")), "'weight_update'"),
    "old and new update key": (configs(exp(method="wanda", update="optima", weight_update="optima")), "old name"),
    "zero-shot task typo": (configs(exp(eval_datasets=[], zero_shot_tasks=["boolqq"])), "'zero_shot_tasks'"),
    "mmlu subjects empty": (configs(exp(zero_shot_tasks=["mmlu"], mmlu_subjects=[])), "'mmlu_subjects'"),
    "targets a string": (configs(exp(method="wanda", targets="q_proj")), "'targets'"),
    "targets on dense": (configs(exp(targets=["*"])), "'targets'"),
    "targets matching no layer": (configs(exp(method="wanda", targets=["self_attn.q_porj"])), "config key 'targets': pattern 'self_attn.q_porj' matches no linear layer"),
    "ignore matching no layer": (configs(exp(method="wanda", ignore=["mlp.dwn_proj"])), "config key 'ignore': pattern 'mlp.dwn_proj' matches no linear layer"),
    "ignore leaving nothing": (configs(exp(method="wanda", ignore=["*"])), "leave no linear layer"),
    "recon_window past the blocks": (configs(exp(method="wanda", block_update="reconstruct", recon_window=31)),
                                     "config key 'recon_window': got 31, but the model has 30 blocks; allowed values: 1 to 30"),
    "images for a language model": (configs(exp(method="wanda", cal_dataset="photos")), "is a language model"),
    "model missing": (configs("ConfigDict(dict(method='wanda'))"), "'model'"),
    "model folder missing": (configs(exp(model="./no/such/model")), "'model'"),
    "model folder without config": (None, "config.json"),
    "data_dir missing": (configs(exp(method="wanda", cal_dataset="wikitext2", data_dir="/no/such/dir")), "'cal_dataset'"),
    "data_dir without the files": (None, "'eval_datasets'"),
    "zero-shot files missing": (None, "'zero_shot_tasks'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_config_fails_in_one_line_before_any_model_loads(case, tmp_path, capsys, no_model_loads):
    text, fragment = CASES[case]
    if case == "model folder without config":
        (tmp_path / "m").mkdir()
        text = configs(exp(model=str(tmp_path / "m")))
    elif case == "data_dir without the files":
        (tmp_path / "data").mkdir()
        text = configs(exp(eval_datasets=["wikitext2"], data_dir=str(tmp_path / "data")))
    elif case == "zero-shot files missing":
        (tmp_path / "data").mkdir()
        text = configs(exp(eval_datasets=[], zero_shot_tasks=["boolq"], data_dir=str(tmp_path / "data")))
    err = config_error(tmp_path, capsys, text)
    assert err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


@pytest.mark.parametrize("argv, fragment", [
    (["--only", "nope"], "--only: no experiment named 'nope'"),
    (["--index", "7"], "--index: 7 is out of range"),
    (["--config", "/no/such/file.py"], "--config: '/no/such/file.py' is not a file"),
])
def test_bad_command_line_names_the_flag(argv, fragment, tmp_path, capsys, no_model_loads):
    f = tmp_path / "cfg.py"
    f.write_text(configs(exp(name="a")))
    args = ["--config", str(f), "--out", str(tmp_path / "out"), *argv]
    assert main.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "config key '--" not in err, err


def test_whole_list_is_checked_before_the_first_experiment(tmp_path, capsys, no_model_loads):
    """The 2nd experiment's problem stops the run before the 1st experiment loads anything."""
    f = tmp_path / "cfg.py"
    f.write_text(configs(exp(name="fine"), exp(name="broken", method="wanda", cal_seqlen=100000)))
    assert main.main(["--config", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "experiment 'broken'" in capsys.readouterr().err


def test_read_only_output_is_refused_before_loading(tmp_path, capsys, no_model_loads):
    (tmp_path / "file").write_text("not a folder")
    f = tmp_path / "cfg.py"
    f.write_text(configs(exp(name="a")))
    assert main.main(["--config", str(f), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot be written" in err

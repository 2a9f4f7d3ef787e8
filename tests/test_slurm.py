"""Sweeps through submitit: the sbatch array a real SLURM would get, and a two-experiment array run by
submitit's LocalExecutor on this machine, ending in the usual result layout."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import textwrap

import pytest
import torch

import main
from oats.config import ConfigError
from oats.slurm import make_options, render_sbatch, sbatch_parameters

CONFIG = textwrap.dedent('''
    from ml_collections import ConfigDict
    BASE = dict(model="smollm2-135m", method="dense", eval_datasets=["pydoc"], eval_seqlen=64, eval_max_windows=2, device="cpu")
    CONFIGS = [ConfigDict({**BASE, "name": "first"}), ConfigDict({**BASE, "name": "second", "eval_max_windows": 1}),
               ConfigDict({**BASE, "name": "third", "eval_max_windows": 3})]
    SLURM = dict(partition="gpu-a100", mem=32, setup=["module load cuda/12.1"])
''')


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(CONFIG)
    return path


def _sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_rendered_sbatch_array_has_the_requested_resources():
    opts = make_options({"partition": "gpu-a100", "mem": 32}, gpus=2, time=90, cpus=6, array_parallelism=3, mem=None, qos="high")
    flags = _sbatch_flags(render_sbatch(opts, n_tasks=5, folder="/logs"))
    assert flags["array"] == "0-4%3"  # five tasks, three at a time
    assert flags["partition"] == "gpu-a100" and flags["qos"] == "high"
    assert flags["gpus-per-node"] == "2" and flags["cpus-per-task"] == "6"
    assert flags["time"] == "90" and flags["mem"] == "32GB"  # minutes; file value kept where the CLI gave None
    assert flags["nodes"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["output"].startswith("/logs/%A_%a/")  # one log folder per array task
    assert _sbatch_flags(render_sbatch(make_options(array_parallelism=16), 2))["array"] == "0-1%2"
    assert "gpus-per-node" not in sbatch_parameters(make_options(gpus=0))


@pytest.mark.parametrize("bad, key", [({"gpus": -1}, "--gpus"), ({"time": 0}, "--time"), ({"mem": "lots"}, "--mem"),
                                      ({"executor": "kubernetes"}, "--slurm-executor"), ({"array_parallelism": 1.5}, "--array-parallelism")])
def test_bad_options_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        make_options(**bad)
    with pytest.raises(ConfigError, match="unknown option"):
        make_options({"partitoin": "gpu"})


def test_slurm_submission_through_sbatch(tmp_path, config_file, monkeypatch):
    """With fake sbatch/srun on PATH, `--slurm` goes through submitit's real SlurmExecutor: the script it
    hands sbatch is the array we asked for, and each task's pickle calls run_task with its experiment's name and hash."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    captured = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {captured}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    out = tmp_path / "runs"
    (out / "second").mkdir(parents=True)  # "second" is done already: not submitted again
    from oats.config import config_hash, resolve_all
    from oats.records import write_record

    second = resolve_all(__import__("runpy").run_path(str(config_file))["CONFIGS"])[1]
    write_record(out / "second", {"status": "ok", "config_hash": config_hash(second)})

    rc = main.main(["--config", str(config_file), "--out", str(out), "--slurm", "--gpus", "1", "--time", "30", "--cpus", "4"])
    assert rc == 0
    flags = _sbatch_flags(captured.read_text())
    assert flags["array"] == "0-1%2" and flags["partition"] == "gpu-a100" and flags["mem"] == "32GB"
    assert flags["time"] == "30" and flags["gpus-per-node"] == "1" and flags["cpus-per-task"] == "4"
    assert "module load cuda/12.1" in captured.read_text() and "submitit.core._submit" in captured.read_text()
    pickles = sorted((out / "slurm").glob("4242_*/*_submitted.pkl"))
    assert len(pickles) == 2
    calls = []
    for p in pickles:
        with open(p, "rb") as f:
            d = pickle.load(f)
        calls.append((d.function.__name__, d.args[1], d.args[2], d.args[3]))
    cfgs = {c.name: c for c in resolve_all(__import__("runpy").run_path(str(config_file))["CONFIGS"])}
    assert sorted(calls) == sorted(("run_task", n, config_hash(cfgs[n]), str(out.resolve())) for n in ("first", "third"))


def test_local_executor_runs_a_two_experiment_array(tmp_path, config_file):
    out = tmp_path / "runs"
    rc = main.main(["--config", str(config_file), "--out", str(out), "--only", "first", "--only", "second",
                    "--slurm", "--slurm-executor", "local", "--wait", "--time", "20"])
    assert rc == 0
    for name, windows in (("first", 2), ("second", 1)):
        rec = json.loads((out / name / "result.json").read_text())
        assert rec["status"] == "ok" and rec["config"]["eval_max_windows"] == windows
        assert rec["metrics"]["ppl"]["pydoc"] > 1.0
    assert not (out / "third").exists()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main.main(["--config", str(config_file), "--out", str(out), "--list"]) == 0
    listed = {line.split()[-1]: line.split()[1] for line in buf.getvalue().strip().splitlines() if not line.startswith("statuses")}
    assert listed == {"first": "done", "second": "done", "third": "pending"}


def test_a_slurm_task_exports_its_model(tmp_path, tiny_model_dir):
    """``export_format`` runs inside the experiment, so an array task exports as a local run does."""
    cfg = tmp_path / "export_sweep.py"
    cfg.write_text(textwrap.dedent(f'''
        from ml_collections import ConfigDict
        CONFIGS = [ConfigDict(dict(name="o", model={str(tiny_model_dir)!r}, method="oats", num_iters=2, compress=True,
                                   cal_nsamples=2, cal_seqlen=32, eval_seqlen=32, eval_max_windows=2, device="cpu",
                                   save_model=True, export_format="bitmask"))]
    '''))
    out = tmp_path / "runs"
    assert main.main(["--config", str(cfg), "--out", str(out), "--slurm", "--slurm-executor", "local", "--wait", "--time", "20"]) == 0
    rec = json.loads((out / "o" / "result.json").read_text())
    assert rec["status"] == "ok" and rec["export"]["format"] == "bitmask" and rec["export"]["total"]["tensor_bytes"] > 0
    from transformers import AutoModelForCausalLM

    from factored.module import load_compressed

    stock = AutoModelForCausalLM.from_pretrained(out / "o" / "export", trust_remote_code=True)
    ours = load_compressed(out / "o" / "model")
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)

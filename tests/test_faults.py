"""Faults: kills during a record write, during checkpoint cleanup and between blocks; unreadable
records; a read-only output; two processes on one experiment; a config list edited between submission
and run. Each: no record lost or corrupted, the sweep goes on, nothing outside the experiment's folder
written or deleted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ml_collections import ConfigDict

import main
from oats.checkpoint import CHECKPOINT_DIR, DELETING, MARKER, BlockCheckpointer
from oats.config import ConfigError, config_hash, resolve, resolve_all
from oats.sweep import experiment_lock, run_all, status_of


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so the sweep's failure handling does not catch it."""


def _cfg(model_dir, name="a", **kw) -> ConfigDict:
    base = dict(model=str(model_dir), method="wanda", name=name, cal_nsamples=2, cal_seqlen=32, cal_batch_size=2,
                eval_seqlen=32, eval_max_windows=2, device="cpu")
    return resolve(ConfigDict({**base, **kw}))


def _die_after_first_checkpoint(monkeypatch):
    """Make BlockCheckpointer.save kill the run right after it committed a checkpoint; returns the real save."""
    real = BlockCheckpointer.save

    def save_then_die(self, i, *a, **k):
        real(self, i, *a, **k)
        raise _Killed

    monkeypatch.setattr(BlockCheckpointer, "save", save_then_die)
    return real


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _outside(root: Path, exp: str) -> dict[str, bytes]:
    return {k: v for k, v in _tree(root).items() if not k.startswith(exp + os.sep) and k != "summary.md"}


def test_kill_during_record_write_keeps_the_old_record(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir)
    assert run_all([cfg], out) == {"a": "ok"}
    before = (out / "a" / "result.json").read_bytes()
    import data.files

    real = os.replace

    def die_on_result(src, dst):
        if str(dst).endswith("result.json"):
            raise _Killed
        return real(src, dst)

    monkeypatch.setattr(data.files.os, "replace", die_on_result)
    with pytest.raises(_Killed):
        run_all([cfg], out, force=True)
    monkeypatch.setattr(data.files.os, "replace", real)
    assert (out / "a" / "result.json").read_bytes() == before  # the old record, whole
    assert not list((out / "a").glob(".result.json.*.tmp"))  # no half-written temporary left
    assert status_of(cfg, out) == "done"


def test_kill_during_checkpoint_cleanup_leaves_nothing_that_breaks_the_next_run(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, checkpoint_blocks=True)
    import oats.checkpoint

    real = oats.checkpoint.shutil.rmtree

    def half_then_die(path, *a, **k):
        files = sorted(Path(path).iterdir())
        for f in files[: len(files) // 2]:  # part of the folder goes (the marker among the first, alphabetically)
            f.unlink()
        raise _Killed

    monkeypatch.setattr(oats.checkpoint.shutil, "rmtree", half_then_die)
    with pytest.raises(_Killed):
        run_all([cfg], out)
    monkeypatch.setattr(oats.checkpoint.shutil, "rmtree", real)
    assert json.loads((out / "a" / "result.json").read_text())["status"] == "ok"  # the record was written first
    assert list((out / "a").glob(f"{DELETING}*"))  # the half-deleted folder, under the runner's own name
    assert run_all([cfg], out, force=True) == {"a": "ok"}  # --force after the kill: no crash
    assert not list((out / "a").glob(f"{DELETING}*")) and not (out / "a" / CHECKPOINT_DIR).exists()


def test_failed_checkpoint_cleanup_does_not_abort_the_sweep(tmp_path, tiny_model_dir, monkeypatch):
    def refuse(self):
        raise RuntimeError("refusing to delete")

    monkeypatch.setattr(BlockCheckpointer, "clear", refuse)
    out = tmp_path / "out"
    assert run_all([_cfg(tiny_model_dir, "a", checkpoint_blocks=True), _cfg(tiny_model_dir, "b")], out) == {"a": "ok", "b": "ok"}


def test_kill_between_blocks_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """(The bit-for-bit version on SmolLM2 is tests/test_resume.py.)"""
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, checkpoint_blocks=True)
    real = _die_after_first_checkpoint(monkeypatch)
    with pytest.raises(_Killed):
        run_all([cfg], out)
    monkeypatch.setattr(BlockCheckpointer, "save", real)
    assert run_all([cfg], out) == {"a": "ok"}
    rec = json.loads((out / "a" / "result.json").read_text())
    assert rec["resumed_after_block"] == 1


@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe not utf-8", b'{"half": ', b'"a string"'])
def test_unreadable_record_is_not_done_is_kept_aside_and_breaks_nothing(content, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    a, b = _cfg(tiny_model_dir, "a"), _cfg(tiny_model_dir, "b")
    (out / "a").mkdir(parents=True)
    (out / "a" / "result.json").write_bytes(content)
    assert status_of(a, out) == "pending"
    f = tmp_path / "cfg.py"
    f.write_text(f"from ml_collections import ConfigDict\nCONFIGS=[ConfigDict({a.to_dict()!r}), ConfigDict({b.to_dict()!r})]\n")
    assert main.main(["--config", str(f), "--out", str(out), "--list"]) == 0  # --list survives it
    assert run_all([b], out) == {"b": "ok"}  # another experiment's sweep and its summary survive it
    assert (out / "summary.md").is_file()
    assert run_all([a], out) == {"a": "ok"}
    aside = list((out / "a").glob("result.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept, not overwritten blindly


def test_record_that_cannot_be_written_is_a_failure_and_the_sweep_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    import oats.sweep

    real = oats.sweep.write_record

    def deny(exp_dir, record):
        if Path(exp_dir).name == "a":
            raise PermissionError(13, "Permission denied")
        return real(exp_dir, record)

    monkeypatch.setattr(oats.sweep, "write_record", deny)
    out = tmp_path / "out"
    assert run_all([_cfg(tiny_model_dir, "a"), _cfg(tiny_model_dir, "b")], out) == {"a": "failed", "b": "ok"}


def test_two_processes_on_one_experiment(tmp_path, tiny_model_dir):
    """The lock is fcntl's, per open file: holding it here is what a second process sees."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir)
    with experiment_lock(out / "a") as held:
        assert held
        assert run_all([cfg, _cfg(tiny_model_dir, "b")], out) == {"a": "busy", "b": "ok"}
        assert not (out / "a" / "result.json").exists()
    assert run_all([cfg], out) == {"a": "ok"}


def test_config_list_edited_between_submission_and_run(tmp_path, tiny_model_dir):
    from oats.slurm import run_task

    out = tmp_path / "out"
    f = tmp_path / "cfg.py"
    cfgs = [_cfg(tiny_model_dir, "a"), _cfg(tiny_model_dir, "b")]
    f.write_text("from ml_collections import ConfigDict\nCONFIGS=[" + ", ".join(f"ConfigDict({c.to_dict()!r})" for c in cfgs) + "]\n")
    submitted = {c.name: config_hash(c) for c in cfgs}
    # edited while the tasks wait: 'a' removed and 'b' changed, a new experiment first in the list
    edited = [_cfg(tiny_model_dir, "new"), _cfg(tiny_model_dir, "b", eval_max_windows=1)]
    f.write_text("from ml_collections import ConfigDict\nCONFIGS=[" + ", ".join(f"ConfigDict({c.to_dict()!r})" for c in edited) + "]\n")
    with pytest.raises(ConfigError, match="no longer has it"):
        run_task(str(f), "a", submitted["a"], str(out))
    with pytest.raises(ConfigError, match="changed since submission"):
        run_task(str(f), "b", submitted["b"], str(out))
    assert not out.exists() or not list(out.rglob("result.json"))  # nothing ran in their place
    assert run_task(str(f), "b", config_hash(resolve_all(__import__("runpy").run_path(str(f))["CONFIGS"])[1]), str(out)) == {"b": "ok"}


def test_nothing_outside_the_experiment_folder_is_written_or_deleted(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    (out / "other").mkdir(parents=True)
    (out / "other" / "keep.txt").write_text("a person's file")
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_text("not ours")
    before = _outside(out, "a")
    assert run_all([_cfg(tiny_model_dir, lazy_load=True, checkpoint_blocks=True)], out) == {"a": "ok"}
    assert _outside(out, "a") == before


def test_lazy_model_folder_without_marker_is_never_deleted(tmp_path):
    from data.files import remove_tree

    d = tmp_path / "exp" / "model"
    d.mkdir(parents=True)
    (d / "x").write_text("x")
    with pytest.raises(RuntimeError, match="marker"):
        remove_tree(d, inside=tmp_path / "exp", marker="OATS_MODEL")
    with pytest.raises(RuntimeError, match="not inside"):
        remove_tree(tmp_path / "exp", inside=tmp_path / "exp" / "model", marker="OATS_MODEL")
    assert (d / "x").is_file()


def test_checkpoint_meta_cannot_point_outside_its_folder(tmp_path):
    ck = BlockCheckpointer(tmp_path / "exp", "h")
    ck.dir.mkdir(parents=True)
    (ck.dir / MARKER).touch()
    victim = tmp_path / "victim.pt"
    victim.write_text("keep")
    (ck.dir / "meta.json").write_text(json.dumps({"format": 2, "config_hash": "h", "last_block": 0, "state": "../../victim.pt",
                                                  "save_blocks": True}))
    assert ck.load() is None and victim.read_text() == "keep"


def test_files_follow_the_users_umask(tmp_path):
    from data.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0o600


def test_compress_mode_resumes_from_safetensors_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    """Factored layers survive a checkpoint without pickling: the block JSON names them, safetensors hold them."""
    cfg = _cfg(tiny_model_dir, method="oats", num_iters=2, compress=True, checkpoint_blocks=True)
    ref = tmp_path / "ref"
    assert run_all([_cfg(tiny_model_dir, method="oats", num_iters=2, compress=True)], ref) == {"a": "ok"}
    real = _die_after_first_checkpoint(monkeypatch)
    with pytest.raises(_Killed):
        run_all([cfg], tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "a" / CHECKPOINT_DIR / "block_00000.json").read_text())
    assert set(meta["compressed_layers"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    monkeypatch.setattr(BlockCheckpointer, "save", real)
    assert run_all([cfg], tmp_path / "out") == {"a": "ok"}
    got = json.loads((tmp_path / "out" / "a" / "result.json").read_text())
    want = json.loads((ref / "a" / "result.json").read_text())
    assert got["resumed_after_block"] == 1 and got["metrics"] == want["metrics"]

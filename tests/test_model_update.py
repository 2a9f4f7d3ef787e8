"""Model updates (``model_update``) and low-rank recovery: the coarsened KL against a float64 brute force,
only the low-rank factors (and norms when asked) change, planted factors are recovered, the
framework's checks catch an update that touches a mask, the merged model is S + U V, the plan counts
the update, a killed distillation goes on from its last epoch to the same factors, and bad input fails
in one line before any model loads."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from ml_collections import ConfigDict
from torch import nn

from block_updates.holdout import holdout_windows
from factored.module import SparseLowRankLinear, compressed_layers
from model_updates.lowrank_recovery import SEED, coarse_kl
from oats import registry
from oats.compressor import compress_model
from oats.config import config_hash, resolve
from oats.experiment import Calibrated, update_model
from oats.interface import Allocation, DenseTargets, ModelUpdate
from oats.model_update import dense_targets, merge_factored, run_model_update
from oats.pipeline import capture_inputs
from tests.conftest import config_error, tiny_model

CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(model="tiny", method="oats", sparsity=0.6, rank_ratio=0.3, num_iters=10, cal_batch_size=8,
                model_update="lowrank_recovery", recovery_topk=16)
    return resolve(ConfigDict({**base, **kw}))


def _compressed(cfg, layers: int = 2, seed: int = 3):
    """(dense copy, compressed model with SparseLowRankLinear layers, dense targets) of a tiny Llama."""
    model = tiny_model("llama", layers=layers, seed=seed)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    targets = dense_targets(model, ids, int(cfg.get("recovery_topk", 16)), CPU, 4)
    inputs = capture_inputs(model, ids, CPU, 8)
    compress_model(model, inputs, cfg, CPU, [cfg.sparsity] * layers)
    return dense, model, targets


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the loss ---------------------------------------------------------------------------------------

def _brute_kl(p_full: torch.Tensor, q_full: torch.Tensor, top: torch.Tensor) -> float:
    """KL over the outcomes {each token of top, everything else}, float64, one position at a time."""
    total = 0.0
    for pos in range(p_full.shape[0]):
        keep = set(top[pos].tolist())
        p = [float(p_full[pos, t]) for t in top[pos].tolist()] + [float(sum(p_full[pos, t] for t in range(p_full.shape[1]) if t not in keep))]
        q = [float(q_full[pos, t]) for t in top[pos].tolist()] + [float(sum(q_full[pos, t] for t in range(q_full.shape[1]) if t not in keep))]
        total += sum(a * (torch.tensor(a).log() - torch.tensor(b).log()).item() for a, b in zip(p, q) if a > 0)
    return total / p_full.shape[0]


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_coarse_kl_is_the_kl_of_the_coarsened_distributions(k):
    g = torch.Generator().manual_seed(k)
    p_logits, q_logits = torch.randn(5, 10, generator=g, dtype=torch.float64) * 2, torch.randn(5, 10, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(p_logits, -1)
    top = logp.topk(k, -1)
    got = float(coarse_kl(q_logits.float(), top.values.float(), top.indices))
    want = _brute_kl(logp.exp(), torch.softmax(q_logits, -1), top.indices)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    if k == 10:  # the whole vocabulary: the full KL
        assert got == pytest.approx(float(torch.nn.functional.kl_div(torch.log_softmax(q_logits, -1), logp, log_target=True,
                                                                     reduction="sum") / 5), rel=1e-4)
    assert float(coarse_kl(p_logits.float(), top.values.float(), top.indices)) == pytest.approx(0.0, abs=1e-6)


# --- what the recovery changes ------------------------------------------------------------------------

@pytest.mark.parametrize("norms", [False, True])
def test_recovery_changes_only_the_low_rank_factors_and_norms_when_asked(norms):
    cfg = _cfg(recovery_epochs=2, recovery_lr=1e-2, recovery_holdout=0.0, recovery_norms=norms)
    _, model, targets = _compressed(cfg)
    before, grads = _state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    after = _state(model)
    assert before.keys() == after.keys() and grads == {n: p.requires_grad for n, p in model.named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    factors = {k for k in before if k.endswith((".U", ".V"))}
    norm_weights = {k for k in before if "norm" in k and k.endswith(".weight")}
    assert factors and changed >= factors - {k for k in factors if before[k].numel() == 0}
    assert changed <= factors | (norm_weights if norms else set()), sorted(changed - factors)
    if norms:
        assert changed & norm_weights
    assert info["kept_params_before"] == info["kept_params_after"] == sum(m.param_count() for m in compressed_layers(model).values())
    assert all(isinstance(m.U, nn.Parameter) and isinstance(m.V, nn.Parameter) for m in compressed_layers(model).values())


def test_recovery_finds_planted_factors():
    """Targets from a model whose layers are exactly S + U* V*; the compressed model starts from perturbed
    factors: recovery must remove most of the divergence."""
    cfg = _cfg(recovery_epochs=10, recovery_lr=5e-3, recovery_holdout=0.0, recovery_batch_size=2, recovery_topk=128)
    _, model, _ = _compressed(cfg, seed=5)
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in compressed_layers(teacher).values():  # the planted factors: the compressed ones, scaled up
            m.U.mul_(3.0)
    merge_factored(teacher)
    ids = torch.randint(0, 128, (16, 32), generator=g)
    targets = dense_targets(teacher, ids, 128, CPU, 4)
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    assert info["loss_measured_on"] == "all windows" and info["windows_holdout"] == 0
    assert info["loss_after"] < 0.3 * info["loss_before"], (info["loss_before"], info["loss_after"])
    assert not info["reverted"] and info["steps"] == len(info["train_loss_per_step"]) == 10 * 8


def test_a_too_large_learning_rate_is_reverted():
    cfg = _cfg(recovery_epochs=1, recovery_lr=10.0, recovery_holdout=0.0)
    _, model, targets = _compressed(cfg)
    before = _state(model)
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    assert info["reverted"] and info["loss_after"] == info["loss_before"]
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_early_stopping_restores_the_best_epoch():
    cfg = _cfg(recovery_epochs=4, recovery_lr=10.0, recovery_holdout=0.25)
    _, model, targets = _compressed(cfg)
    before = _state(model)
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    assert info["epochs_run"] == 1 and info["best_epoch"] == 0 and info["reverted"]
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


@pytest.mark.parametrize("patience, epochs_run", [(1, 2), (2, 3), (3, 4), (9, 4)])
def test_patience_trains_on_through_that_many_epochs_without_a_new_best(patience, epochs_run):
    """Every epoch at this learning rate is worse than the start: training stops after patience + 1 of
    them (or at the last epoch) and the given factors come back."""
    cfg = _cfg(recovery_epochs=4, recovery_lr=10.0, recovery_holdout=0.25, recovery_patience=patience)
    _, model, targets = _compressed(cfg)
    before = _state(model)
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    assert info["epochs_run"] == len(info["holdout_loss_per_epoch"]) == epochs_run, info["holdout_loss_per_epoch"]
    assert all(h >= info["loss_before"] for h in info["holdout_loss_per_epoch"])
    assert info["best_epoch"] == 0 and info["reverted"] and info["patience"] == patience
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_patience_changes_nothing_while_every_epoch_improves():
    """A run whose held-out loss falls every epoch is the same computation whatever the patience, and the
    default patience keeps the config hashes of runs made before the key existed."""
    runs = []
    for patience in (0, 3):
        cfg = _cfg(recovery_epochs=3, recovery_lr=1e-3, recovery_holdout=0.25, recovery_patience=patience)
        _, model, targets = _compressed(cfg)
        info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
        runs.append((cfg, info, _state(model)))
    (cfg0, info0, state0), (cfg3, info3, state3) = runs
    assert info0["epochs_run"] == info3["epochs_run"] == info0["best_epoch"] == 3, info0["holdout_loss_per_epoch"]
    assert info0["holdout_loss_per_epoch"] == info3["holdout_loss_per_epoch"]
    assert all(torch.equal(state0[k], state3[k]) for k in state0)
    unset = _cfg(recovery_epochs=3, recovery_lr=1e-3, recovery_holdout=0.25)
    assert config_hash(cfg0) == config_hash(unset) != config_hash(cfg3)


def test_patience_restores_the_best_epoch_when_it_is_not_the_last():
    """At this learning rate the first epoch is the best and the next two are worse: with a patience of 3
    all three run, and the first epoch's factors are what is kept."""
    cfg = _cfg(recovery_epochs=3, recovery_lr=3e-3, recovery_holdout=0.25, recovery_patience=3)
    _, model, targets = _compressed(cfg)
    info = run_model_update(model, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    curve = info["holdout_loss_per_epoch"]
    assert info["epochs_run"] == 3 and info["best_epoch"] == 1 and curve[0] < min(curve[1:]), curve
    assert info["loss_after"] == pytest.approx(curve[0], abs=1e-6) and not info["reverted"]
    held = holdout_windows(targets.ids.shape[0], 0.25, SEED)
    with torch.no_grad():  # the model as left: its held-out loss is the first epoch's, not the last's
        kl = sum(float(coarse_kl(model(targets.ids[i : i + 1]).logits[0], targets.logprobs[i], targets.index[i])) for i in held) / len(held)
    assert kl == pytest.approx(info["loss_after"], rel=1e-4) and curve[-1] - kl > 1e-5


# --- the framework around it --------------------------------------------------------------------------

def _rogue(touch: str):
    def apply(model, layers, targets, logits_of, cfg, device):
        m = next(iter(layers.values()))
        with torch.no_grad():
            if touch == "values":
                m.values[0] += 1.0
            elif touch == "mask":
                m.mask[0, 0] ^= 1
        return {}
    return ModelUpdate("rogue", apply, topk=lambda cfg: 4)


@pytest.mark.parametrize("touch", ["values", "mask"])
def test_an_update_that_touches_the_sparse_part_is_refused(touch):
    cfg = _cfg()
    _, model, targets = _compressed(cfg)
    with pytest.raises(RuntimeError, match="changed the sparse values, mask or rank"):
        run_model_update(model, _rogue(touch), targets, cfg, CPU)


def test_without_compress_mode_the_factors_are_merged_back_as_dense_weights():
    cfg = _cfg(recovery_epochs=1, recovery_lr=1e-3)
    _, model, targets = _compressed(cfg)
    layers = compressed_layers(model)
    assert layers, "a model update holds the compressed linears factored"
    cal = Calibrated(None, [], Allocation.uniform(0.6, 2), dense_targets=targets)
    update_model(cfg, model, cal, CPU)
    expected = {n: (m.sparse_dense() + m.U @ m.V).detach().clone() for n, m in layers.items()}
    assert not compressed_layers(model) and cal.model_update["name"] == "lowrank_recovery"
    for n, W in expected.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and torch.allclose(lin.weight, W, atol=1e-6)

    cfg2 = _cfg(recovery_epochs=1, recovery_lr=1e-3, compress=True)
    _, model2, targets2 = _compressed(cfg2)
    update_model(cfg2, model2, Calibrated(None, [], Allocation.uniform(0.6, 2), dense_targets=targets2), CPU)
    assert compressed_layers(model2)


def test_dense_targets_are_the_models_top_k_log_probabilities():
    model = tiny_model("llama", layers=2, seed=1)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    t = dense_targets(model, ids, 5, CPU, 2)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    assert t.logprobs.shape == (3, 16, 5) and torch.allclose(t.logprobs, ref.topk(5, -1).values, atol=1e-5)
    assert torch.equal(ref.gather(-1, t.index), t.logprobs) or torch.allclose(ref.gather(-1, t.index), t.logprobs, atol=1e-5)
    assert dense_targets(model, ids, 10_000, CPU).topk == 128  # at most the vocabulary
    assert isinstance(t.windows([0, 2]), DenseTargets) and t.windows([0, 2]).ids.shape == (2, 16)


def test_an_experiment_records_the_update(tiny_model_dir, tmp_path):
    from oats.experiment import run_experiment

    cfg = resolve(ConfigDict(dict(model=str(tiny_model_dir), method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=5,
                                  cal_dataset="pydoc", cal_nsamples=6, cal_seqlen=32, eval_datasets=["pydoc"], eval_seqlen=32,
                                  eval_max_windows=2, device="cpu", model_update="lowrank_recovery", recovery_epochs=1,
                                  recovery_topk=8)))
    rec = run_experiment(cfg, tmp_path / "x")
    mu = rec["model_update"]
    assert mu["name"] == "lowrank_recovery" and mu["sparse_parts_unchanged"] and mu["kept_params_after"] == mu["kept_params_before"]
    assert mu["windows_holdout"] == 1 and mu["windows_train"] == 5 and mu["steps"] == 2
    assert rec["achieved_sparsity"] == pytest.approx(1 - sum(r["kept_params"] for r in rec["layers"]) / sum(r["shape"][0] * r["shape"][1] for r in rec["layers"]))


# --- config -----------------------------------------------------------------------------------------

def test_the_key_keeps_existing_hashes_and_names_the_row():
    plain = resolve(ConfigDict(dict(model="smollm2-135m", method="oats")))
    assert config_hash(plain) == config_hash(resolve(ConfigDict(dict(model="smollm2-135m", method="oats", model_update="none"))))
    upd = resolve(ConfigDict(dict(model="smollm2-135m", method="oats", model_update="lowrank_recovery")))
    assert config_hash(upd) != config_hash(plain) and upd.name.endswith("-lowrank_recovery")
    assert config_hash(upd) != config_hash(resolve(ConfigDict(dict(model="smollm2-135m", method="oats", model_update="lowrank_recovery",
                                                                    recovery_lr=3e-4))))
    assert "recovery_lr" not in plain


def test_the_plan_counts_the_update():
    from oats.plan import plan_experiment

    plain = plan_experiment(resolve(ConfigDict(dict(model="smollm2-135m", method="oats", device="cpu"))))
    upd = plan_experiment(resolve(ConfigDict(dict(model="smollm2-135m", method="oats", device="cpu", model_update="lowrank_recovery"))))
    assert upd.parts["dense_targets"] == 128 * 2048 * 64 * 12
    assert upd.parts["model_update"] > 0 and upd.cpu_peak > plain.cpu_peak


HEAD = "from ml_collections import ConfigDict\nB = dict(model='smollm2-135m', cal_nsamples=4, cal_seqlen=32, eval_seqlen=32, eval_max_windows=1)\n"

BAD = {
    "a method without a low-rank part": (dict(method="wanda", model_update="lowrank_recovery"),
                                         "config key 'model_update': 'lowrank_recovery' trains the low-rank factors, and method 'wanda' has none; use a sparse + low-rank method (gram_slr, oats)"),
    "the dense row": (dict(method="dense", model_update="lowrank_recovery"), "config key 'model_update': got 'lowrank_recovery', but method 'dense' compresses nothing"),
    "lazy_load": (dict(method="oats", model_update="lowrank_recovery", lazy_load=True),
                  "config key 'model_update': 'lowrank_recovery' trains the whole model end to end, which lazy_load never holds in memory"),
    "a vision experiment": (dict(model="dinov2-small-imgfocus", method="oats", cal_dataset="photos", model_update="lowrank_recovery"),
                            "config key 'model_update': 'lowrank_recovery' distils next-token distributions, and 'photos' makes a vision experiment"),
    "an unknown update": (dict(method="oats", model_update="lora"), "config key 'model_update'"),
    "a recovery key without the update": (dict(method="oats", recovery_lr=1e-4), "config key 'recovery_lr': belongs to model_update 'lowrank_recovery'"),
    "a bad holdout": (dict(method="oats", model_update="lowrank_recovery", recovery_holdout=1.0), "config key 'recovery_holdout'"),
    "a negative patience": (dict(method="sparsegpt", model_update="masked_distill", recovery_patience=-1), "config key 'recovery_patience'"),
    "a patience with no holdout": (dict(method="oats", model_update="lowrank_recovery", recovery_patience=2, recovery_holdout=0.0),
                                   "config key 'recovery_patience'"),
    "a distillation patience with no holdout": (dict(method="sparsegpt", model_update="masked_distill", recovery_patience=1, recovery_holdout=0),
                                                "config key 'recovery_patience'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_update_config_fails_in_one_line_before_any_model_loads(case, tmp_path, capsys, no_model_loads):
    kw, message = BAD[case]
    err = config_error(tmp_path, capsys, HEAD + f"CONFIGS = [ConfigDict(dict(B, **{kw!r}))]\n")
    assert message in err, err


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def _die_after(monkeypatch, cls, name: str, when):
    """``cls.name`` patched to run, then raise _Killed when ``when(*its arguments)``; returns the real one."""
    real = getattr(cls, name)

    def run_then_die(self, *a, **k):
        real(self, *a, **k)
        if when(*a):
            raise _Killed

    monkeypatch.setattr(cls, name, run_then_die)
    return real


def _experiment_cfg(model_dir, **kw):
    """Experiment ``r``: OATS + lowrank_recovery on the tiny model directory, pydoc text, CPU."""
    return resolve(ConfigDict(dict(model=str(model_dir), method="oats", sparsity=0.5, rank_ratio=0.3, num_iters=5, cal_dataset="pydoc",
                                   cal_nsamples=6, cal_seqlen=32, eval_datasets=["pydoc"], eval_seqlen=32, eval_max_windows=2,
                                   device="cpu", model_update="lowrank_recovery", recovery_topk=8, name="r", **kw)))


def test_a_killed_run_resumes_with_the_recorded_targets(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from oats.checkpoint import CHECKPOINT_DIR, BlockCheckpointer
    from oats.model_update import TARGETS_FILE
    from oats.sweep import run_all

    def cfg(**kw):
        return _experiment_cfg(tiny_model_dir, recovery_epochs=1, **kw)
    assert run_all([cfg()], tmp_path / "ref") == {"r": "ok"}
    reference = json.loads((tmp_path / "ref" / "r" / "result.json").read_text())
    real_save = _die_after(monkeypatch, BlockCheckpointer, "save", lambda i, *a: True)
    with pytest.raises(_Killed):
        run_all([cfg(checkpoint_blocks=True)], tmp_path / "out")
    assert (tmp_path / "out" / "r" / CHECKPOINT_DIR / TARGETS_FILE).is_file()
    monkeypatch.setattr(BlockCheckpointer, "save", real_save)
    computed = []
    import oats.model_update as mu
    real_targets = mu.dense_targets
    monkeypatch.setattr(mu, "dense_targets", lambda *a, **k: computed.append(1) or real_targets(*a, **k))
    assert run_all([cfg(checkpoint_blocks=True)], tmp_path / "out") == {"r": "ok"}
    result = json.loads((tmp_path / "out" / "r" / "result.json").read_text())
    assert not computed and result["resumed_after_block"] == 1
    assert result["model_update"]["loss_before"] == reference["model_update"]["loss_before"]
    assert result["metrics"] == reference["metrics"]
    assert not (tmp_path / "out" / "r" / CHECKPOINT_DIR).exists()


class _MemoryStore:
    """An UpdateStore in memory that keeps what a file would (a ``weights_only`` round trip of each saved
    state) and dies right after saving epoch ``die_after``."""

    def __init__(self, die_after: int | None):
        self.state, self.die_after, self.saved_epochs = None, die_after, []

    def save(self, state):
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        self.state = torch.load(buf, weights_only=True)
        self.saved_epochs.append(state["epoch"])
        if state["epoch"] == self.die_after:
            raise _Killed

    def load(self):
        return self.state


def _without_resume_facts(info):
    return {k: v for k, v in info.items() if k not in ("seconds", "train_seconds", "resumed_after_epoch")}


KILLS = {  # update, keys, the epoch the run dies after
    "held out, patience 1": ("lowrank_recovery", dict(recovery_holdout=0.25, recovery_patience=1, recovery_lr=1e-2), 2),
    "no holdout": ("lowrank_recovery", dict(recovery_holdout=0.0, recovery_lr=1e-2), 1),
    "stopped early, then killed": ("lowrank_recovery", dict(recovery_holdout=0.25, recovery_lr=10.0), 1),
    "masked distillation": ("masked_distill", dict(recovery_holdout=0.25, recovery_patience=1, recovery_lr=1e-3), 2),
}


@pytest.mark.parametrize("case", list(KILLS))
def test_a_killed_distillation_goes_on_from_its_last_epoch_to_the_same_factors(case):
    """The resumed run starts from the compressed model as the block checkpoint holds it (the factors
    before any training), so everything it goes on from must come from the store."""
    update, keys, die_after = KILLS[case]
    cfg = _cfg(model_update=update, recovery_epochs=3, **keys)
    _, model, targets = _compressed(cfg)
    killed, resumed = copy.deepcopy(model), copy.deepcopy(model)
    plugin = registry.plugin("model_update", update)
    reference = run_model_update(model, plugin, targets, cfg, CPU)
    store = _MemoryStore(die_after)
    with pytest.raises(_Killed):
        run_model_update(killed, plugin, targets, cfg, CPU, store)
    store.die_after = None
    got = run_model_update(resumed, plugin, targets, cfg, CPU, store)
    assert got["resumed_after_epoch"] == die_after  # and the resumed run saved exactly the epochs it ran:
    assert store.saved_epochs == list(range(1, die_after + 1)) + list(range(die_after + 1, got["epochs_run"] + 1))
    assert _without_resume_facts(got) == _without_resume_facts(reference)
    want = _state(model)
    assert all(torch.equal(v, want[k]) for k, v in _state(resumed).items())
    if case == "stopped early, then killed":
        assert got["epochs_run"] == 1 and got["reverted"] and store.saved_epochs == [1]


def test_an_unreadable_update_state_starts_the_update_over(tmp_path):
    from oats.checkpoint import UpdateFile

    store = UpdateFile(tmp_path / "model_update.pt")
    assert store.load() is None
    store.save({"epoch": 2, "masters": [torch.ones(3)]})
    assert store.load()["epoch"] == 2 and torch.equal(store.load()["masters"][0], torch.ones(3))
    (tmp_path / "model_update.pt").write_bytes(b"not a torch file")
    assert store.load() is None
    torch.save({"epoch": 1, "code": _Killed}, tmp_path / "model_update.pt")  # a pickled class: never loaded
    assert store.load() is None


def test_a_run_killed_during_the_update_resumes_after_its_last_epoch(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from oats.checkpoint import CHECKPOINT_DIR, UPDATE_FILE, UpdateFile
    from oats.sweep import run_all

    def cfg(**kw):
        return _experiment_cfg(tiny_model_dir, recovery_epochs=3, recovery_lr=1e-2, recovery_holdout=0.0, **kw)
    assert run_all([cfg()], tmp_path / "ref") == {"r": "ok"}
    reference = json.loads((tmp_path / "ref" / "r" / "result.json").read_text())
    real_save = _die_after(monkeypatch, UpdateFile, "save", lambda state: state["epoch"] == 2)
    with pytest.raises(_Killed):
        run_all([cfg(checkpoint_blocks=True)], tmp_path / "out")
    assert (tmp_path / "out" / "r" / CHECKPOINT_DIR / UPDATE_FILE).is_file()
    monkeypatch.setattr(UpdateFile, "save", real_save)
    assert run_all([cfg(checkpoint_blocks=True)], tmp_path / "out") == {"r": "ok"}
    result = json.loads((tmp_path / "out" / "r" / "result.json").read_text())
    assert result["resumed_after_block"] == 2 and result["model_update"]["resumed_after_epoch"] == 2  # both blocks were done
    assert _without_resume_facts(result["model_update"]) == _without_resume_facts(reference["model_update"])
    assert result["metrics"] == reference["metrics"]
    assert not (tmp_path / "out" / "r" / CHECKPOINT_DIR).exists()


# --- masked distillation: every kept weight trained, masks fixed ------------------------------------------

def test_masked_distill_trains_the_kept_values_and_factors_on_fixed_masks():
    cfg = _cfg(model_update="masked_distill", recovery_epochs=2, recovery_lr=1e-3, recovery_holdout=0.0)
    _, model, targets = _compressed(cfg)
    before = _state(model)
    info = run_model_update(model, registry.plugin("model_update", "masked_distill"), targets, cfg, CPU)
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if k.endswith((".values", ".U", ".V")) and before[k].numel() > 0}
    assert not info["reverted"] and info["loss_after"] < info["loss_before"]
    assert changed == trained  # every trained tensor moved, nothing else did (masks, biases, norms, embeddings)
    assert info["masks_unchanged"] and "sparse_parts_unchanged" not in info
    assert info["trained_params"] == info["kept_params_after"] == info["kept_params_before"]
    assert all(isinstance(m.values, nn.Parameter) for m in compressed_layers(model).values())


def test_masked_distill_finds_planted_sparse_values():
    """Targets from the compressed model with its sparse values scaled (masks and factors as they are):
    training from the unscaled values must remove most of the divergence, which the low-rank factors
    alone cannot (they are trained too, so the test also holds them to the planted ones' use)."""
    cfg = _cfg(model_update="masked_distill", recovery_epochs=10, recovery_lr=5e-3, recovery_holdout=0.0, recovery_batch_size=2,
               recovery_topk=128)
    _, model, _ = _compressed(cfg, seed=5)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for m in compressed_layers(teacher).values():
            m.values.mul_(2.0)
    merge_factored(teacher)
    targets = dense_targets(teacher, torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0)), 128, CPU, 4)
    student = copy.deepcopy(model)
    info = run_model_update(model, registry.plugin("model_update", "masked_distill"), targets, cfg, CPU)
    low = run_model_update(student, registry.plugin("model_update", "lowrank_recovery"), targets, cfg, CPU)
    assert info["loss_after"] < 0.3 * info["loss_before"], (info["loss_before"], info["loss_after"])
    assert info["loss_after"] < low["loss_after"]


def test_masked_distill_holds_a_pure_sparse_methods_layers_as_rank_zero_and_keeps_its_zeros():
    base = dict(model="tiny", method="sparsegpt", sparsity=0.5, cal_batch_size=8)
    plain_cfg = resolve(ConfigDict(base))
    cfg = resolve(ConfigDict(dict(base, model_update="masked_distill", recovery_topk=16, recovery_epochs=2, recovery_lr=1e-3,
                                  recovery_holdout=0.0)))
    _, plain, _ = _compressed(plain_cfg)
    _, model, targets = _compressed(cfg)
    layers = compressed_layers(model)
    pruned = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n in layers}
    assert layers and set(layers) == set(pruned) and all(m.rank == 0 for m in layers.values())
    for n, m in layers.items():  # before the update: exactly the pruned weight SparseGPT wrote
        assert torch.equal(m.merged_weight(), pruned[n].weight.detach())
    run_model_update(model, registry.plugin("model_update", "masked_distill"), targets, cfg, CPU)
    merge_factored(model)
    for n, lin in pruned.items():
        w = dict(model.named_modules())[n].weight.detach()
        assert torch.equal(w[lin.weight == 0], torch.zeros_like(w[lin.weight == 0]))  # pruned stays pruned
        assert not torch.equal(w, lin.weight.detach())


def test_an_update_that_trains_values_may_not_touch_a_mask():
    cfg = _cfg(model_update="masked_distill")
    _, model, targets = _compressed(cfg)
    values, mask = (dataclasses.replace(_rogue(t), trains_sparse=True) for t in ("values", "mask"))
    assert run_model_update(model, values, targets, cfg, CPU)["masks_unchanged"]
    with pytest.raises(RuntimeError, match="changed the mask or rank"):
        run_model_update(model, mask, targets, cfg, CPU)


def test_an_experiment_records_masked_distillation_of_a_sparse_method(tiny_model_dir, tmp_path):
    from oats.experiment import run_experiment

    def cfg(**kw):
        return resolve(ConfigDict(dict(model=str(tiny_model_dir), method="sparsegpt", sparsity=0.5, cal_dataset="pydoc", cal_nsamples=6,
                                       cal_seqlen=32, eval_datasets=["pydoc"], eval_seqlen=32, eval_max_windows=2, device="cpu", **kw)))
    plain = run_experiment(cfg(), tmp_path / "plain")
    rec = run_experiment(cfg(model_update="masked_distill", recovery_epochs=1, recovery_topk=8), tmp_path / "x")
    mu = rec["model_update"]
    assert mu["name"] == "masked_distill" and mu["masks_unchanged"] and mu["steps"] == 2
    assert mu["trained_params"] == mu["kept_params_before"] == mu["kept_params_after"]
    assert rec["achieved_sparsity"] == pytest.approx(plain["achieved_sparsity"], abs=1e-3)


def test_masked_distill_accepts_every_compressing_method_and_lowrank_recovery_only_sparse_plus_low_rank():
    for method in ("magnitude", "wanda", "sparsegpt", "oats", "gram_slr"):
        cfg = resolve(ConfigDict(dict(model="smollm2-135m", method=method, model_update="masked_distill", recovery_epochs=2)))
        assert cfg.model_update == "masked_distill" and cfg.recovery_epochs == 2
    assert config_hash(resolve(ConfigDict(dict(model="smollm2-135m", method="wanda", model_update="masked_distill")))) != \
        config_hash(resolve(ConfigDict(dict(model="smollm2-135m", method="wanda"))))

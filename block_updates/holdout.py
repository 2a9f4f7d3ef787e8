"""Held-out calibration windows and early stopping on them, shared by every training loop
(block reconstruction, low-rank recovery, masked distillation).

A seeded share of the calibration windows is kept out of training; after each epoch the loss on them is
measured, and training stops once ``patience`` + 1 epochs in a row have not lowered the best loss seen
(at the first such epoch with the default patience 0). The state of the best epoch (possibly the state
before training, epoch 0) is what the caller restores, so the held-out loss never ends above where it
started. The state is snapshotted only when a new best is measured.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch

from oats.keys import ConfigError

SEED = 0
State = TypeVar("State")


def holdout_windows(n_windows: int, share: float, seed: int = SEED) -> list[int]:
    """The held-out windows' indices (sorted) among ``n_windows``: round(share·n), at least 1 and at most
    n - 1 when share > 0 (none when share is 0 or there is a single window), drawn by a seeded permutation."""
    if share <= 0 or n_windows < 2:
        return []
    k = min(n_windows - 1, max(1, round(share * n_windows)))
    return sorted(torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + 1))[:k].tolist())


class EarlyStop(Generic[State]):
    """Best-so-far held-out loss with a patience.

    ``EarlyStop(loss_before, state_before, patience)``, then after epoch e (1-based) ``should_stop(e,
    loss, snapshot)``: ``snapshot()`` is called only when ``loss`` is a new best (strictly lower). The
    fields say what happened: ``best_loss``, ``best_state``, ``best_epoch`` (0 = the state before
    training), ``stopped_at`` (the epoch training stopped after, None when it ran out of epochs) and
    ``last_epoch`` (the last epoch measured); ``best_is_current()`` says whether the state as left by
    training is the best one, i.e. whether the caller has nothing to restore."""

    def __init__(self, loss_before: float, state_before: State, patience: int = 0):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.best_loss, self.best_state, self.best_epoch = loss_before, state_before, 0
        self.loss_before = loss_before
        self.stopped_at: int | None = None
        self.last_epoch = 0
        self._since_best = 0

    def should_stop(self, epoch: int, loss: float, snapshot: Callable[[], State]) -> bool:
        """Record epoch ``epoch``'s held-out loss; True when training should stop now."""
        self.last_epoch = epoch
        if loss < self.best_loss:
            self.best_loss, self.best_state, self.best_epoch = loss, snapshot(), epoch
            self._since_best = 0
            return False
        self._since_best += 1
        if self._since_best > self.patience:
            self.stopped_at = epoch
            return True
        return False

    def best_is_current(self) -> bool:
        return self.best_epoch == self.last_epoch

    def state(self) -> dict:
        """Everything needed to go on later (:meth:`from_state`): plain values and the best state."""
        return {"patience": self.patience, "best_loss": self.best_loss, "best_state": self.best_state, "best_epoch": self.best_epoch,
                "loss_before": self.loss_before, "stopped_at": self.stopped_at, "last_epoch": self.last_epoch,
                "since_best": self._since_best}

    @classmethod
    def from_state(cls, state: dict) -> "EarlyStop":
        stop = cls(state["loss_before"], state["best_state"], state["patience"])
        stop.best_loss, stop.best_state, stop.best_epoch = state["best_loss"], state["best_state"], state["best_epoch"]
        stop.stopped_at, stop.last_epoch, stop._since_best = state["stopped_at"], state["last_epoch"], state["since_best"]
        return stop


def check_patience(patience_key: str, patience: int, holdout_key: str, share: float) -> None:
    """A patience needs held-out windows to be patient with: a one-line config error naming the key otherwise."""
    if patience > 0 and not share > 0:
        raise ConfigError(patience_key, f"got {patience}, but {holdout_key} is 0, so there is no held-out loss to be "
                                        f"patient with; set {holdout_key} in (0, 1) or {patience_key} 0")

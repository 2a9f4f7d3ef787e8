"""block_updates.holdout: the held-out windows and the early-stop rule every training loop shares, checked against
a brute-force reading of the rule on every short loss sequence."""
from __future__ import annotations

import itertools

import pytest

from block_updates.holdout import EarlyStop, check_patience, holdout_windows


def _reference(before: float, losses: list[float], patience: int) -> tuple[int, int | None, int]:
    """(best epoch, epoch stopped after or None, epochs run): after epoch e training stops when the first
    epoch holding the minimum of [before, losses[:e]] is more than ``patience`` epochs back."""
    seen = [before]
    for e, loss in enumerate(losses, 1):
        seen.append(loss)
        best = seen.index(min(seen))
        if e - best > patience:
            return best, e, e
    return seen.index(min(seen)), None, len(losses)


@pytest.mark.parametrize("patience", [0, 1, 2, 5])
def test_early_stop_matches_the_rule_on_every_short_sequence(patience):
    levels = (1.0, 2.0, 3.0)  # ties included: only a strictly lower loss is a new best
    for n in range(1, 6):
        for losses in itertools.product(levels, repeat=n):
            snaps = []
            stop = EarlyStop(2.0, "given", patience)
            ran = 0
            for e, loss in enumerate(losses, 1):
                ran = e
                if stop.should_stop(e, loss, lambda e=e: snaps.append(e) or f"epoch {e}"):
                    break
            best, stopped_at, runs = _reference(2.0, list(losses), patience)
            assert (stop.best_epoch, stop.stopped_at, ran) == (best, stopped_at, runs), (losses, patience)
            assert stop.best_state == ("given" if best == 0 else f"epoch {best}")
            assert stop.best_loss == min((2.0,) + losses[:runs])
            # a snapshot is taken exactly at each new best, never otherwise
            records = [e for e in range(1, runs + 1) if losses[e - 1] < min((2.0,) + losses[: e - 1])]
            assert snaps == records
            assert stop.best_is_current() == (best == runs)


def test_negative_patience_refused():
    with pytest.raises(ValueError, match="patience"):
        EarlyStop(1.0, None, -1)


def test_holdout_windows_are_seeded_and_bounded():
    assert holdout_windows(8, 0.25) == holdout_windows(8, 0.25) and len(holdout_windows(8, 0.25)) == 2
    assert holdout_windows(8, 0.0) == [] and holdout_windows(1, 0.5) == [] and len(holdout_windows(4, 0.99)) == 3
    assert len(holdout_windows(40, 0.1)) == 4 and holdout_windows(40, 0.1) != holdout_windows(40, 0.1, seed=1)
    assert all(0 <= i < 40 for i in holdout_windows(40, 0.5)) and holdout_windows(40, 0.5) == sorted(set(holdout_windows(40, 0.5)))


def test_a_patience_without_held_out_windows_is_refused_by_name():
    from oats.keys import ConfigError

    check_patience("p", 0, "h", 0.0)
    check_patience("p", 3, "h", 0.25)
    with pytest.raises(ConfigError, match="config key 'p': got 3, but h is 0"):
        check_patience("p", 3, "h", 0.0)

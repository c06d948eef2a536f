"""The bookkeeping both stages share (train/runstate.py): best/patience, the one place that
decides early stopping, and how a stop signal and an early stop at the same epoch combine."""

from __future__ import annotations

import pytest

from ptmrec_dist.errors import Interrupted
from ptmrec_dist.train.runstate import RunState


class _Stop:
    sender = "SIGUSR1"


def _state(patience=2, said=None):
    return RunState("recall@20", patience, ("train",), (said if said is not None else []).append, "epochs")


def test_record_keeps_the_best_and_counts_evaluations_since():
    state = _state()
    tests = []
    assert state.record(0, {"recall@20": 0.1}, lambda: tests.append(0) or {"recall@20": 0.2})
    assert not state.record(1, {"recall@20": 0.1}, lambda: tests.append(1))   # ties do not win
    assert state.evals_since_best == 1
    assert state.record(2, {"recall@20": 0.3}, lambda: tests.append(2) or {"recall@20": 0.4})
    assert tests == [0, 2]                       # test metrics only when valid improves
    assert state.best == {"epoch": 2, "valid": {"recall@20": 0.3}, "test": {"recall@20": 0.4}}
    assert state.evals_since_best == 0


def test_epochs_stop_after_patience_evaluations_without_gain():
    said = []
    state = _state(patience=2, said=said)
    seen = []
    for epoch in state.epochs(0, 10):
        seen.append(epoch)
        state.record(epoch, {"recall@20": 0.5 if epoch == 0 else 0.1}, lambda: {})
    assert seen == [0, 1, 2] and state.stopped_early
    assert said == ["early stop: no better valid recall@20 in 2 epochs"]


def test_epochs_run_to_the_end_without_early_stop():
    state = _state(patience=5)
    assert list(state.epochs(3, 6)) == [3, 4, 5] and not state.stopped_early


def test_a_run_resumed_after_its_stopping_evaluation_ends_silently():
    said = []
    state = _state(patience=1, said=said)
    state.restore({"best": {"epoch": 0, "valid": {}, "test": {}}, "bad": 1, "times": {}}, 4)
    assert list(state.epochs(4, 10)) == [] and state.stopped_early and said == []
    assert state.epochs_run == 4


def test_a_stop_signal_ends_the_run_after_its_epoch():
    state = _state(patience=5)
    seen = []
    with pytest.raises(Interrupted, match="stopped by SIGUSR1 after epoch 1; checkpoint ck; "
                                          "continue with --resume"):
        for epoch in state.epochs(0, 10):
            seen.append(epoch)
            state.record(epoch, {"recall@20": float(epoch)}, lambda: {})
            if epoch == 1:
                state.stop_after_epoch(_Stop(), epoch, "ck")
    assert seen == [0, 1]


def test_an_early_stop_wins_over_a_stop_signal_at_the_same_epoch():
    state = _state(patience=1)
    for epoch in state.epochs(0, 10):
        state.record(epoch, {"recall@20": 0.5 if epoch == 0 else 0.1}, lambda: {})
        if epoch == 1:
            state.stop_after_epoch(_Stop(), epoch, None)
    assert state.stopped_early                  # finished: nothing left for a requeue


def test_checkpoint_fields_keep_their_on_disk_names():
    state = _state()
    state.record(0, {"recall@20": 0.5}, lambda: {"recall@20": 0.4})
    state.times["train"].append(1.5)
    state.epochs_run = 1
    assert state.state() == {"best": {"epoch": 0, "valid": {"recall@20": 0.5},
                                      "test": {"recall@20": 0.4}},
                             "bad": 0, "times": {"train": [1.5]}, "epochs_run": 1}
    assert state.mean_time("train", 3) == 1.5


def test_ranks_ask_about_stop_signals_every_n_steps_one_process_every_step():
    """With several ranks the stop check is a collective (an all-reduce, a host sync on GPUs):
    every ``stage2.stop_check_every``-th optimizer step only, the same steps on every rank; one
    process asks after every step, where it costs nothing."""
    from ptmrec_dist.train.checkpoint import StopSignals

    stop = StopSignals()
    assert [s for s in range(1, 31) if stop.due(s, 4, 10)] == [10, 20, 30]
    assert [s for s in range(1, 6) if stop.due(s, 1, 10)] == [1, 2, 3, 4, 5]
    assert all(stop.due(s, 2, 1) for s in range(1, 6))

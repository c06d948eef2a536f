"""A tiny clustered recommendation data set with MMRec-format files, for stage-1 tests.

Users and items belong to one of ``clusters`` groups; a user's items come mostly from its own
group, so an ID model, a content model and the popularity ranking all have something to learn,
and content features (the group one-hot plus noise) are informative.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def make_tiny_dataset(folder: Path, n_users: int = 90, n_items: int = 60, clusters: int = 5,
                      per_user: int = 10, seed: int = 0) -> Path:
    """Writes ``folder/tiny.inter`` (userID itemID x_label) and MMRec's ``image_feat.npy``
    (16-d) / ``text_feat.npy`` (12-d) next to it. Returns the .inter path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_group = np.arange(n_items) % clusters
    pop = rng.pareto(1.5, n_items) + 1
    rows = []
    for u in range(n_users):
        g = u % clusters
        w = pop * np.where(item_group == g, 8.0, 1.0)
        items = rng.choice(n_items, size=per_user, replace=False, p=w / w.sum())
        labels = np.zeros(per_user, dtype=int)
        labels[-2], labels[-1] = 1, 2           # one valid, one test item per user
        rows += [(u, int(i), int(lbl)) for i, lbl in zip(items, labels)]
    path = folder / "tiny.inter"
    path.write_text("userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{lbl}\n"
                                                          for u, i, lbl in rows))
    onehot = np.eye(clusters)[item_group]
    image = np.concatenate([2 * onehot, rng.normal(size=(n_items, 16 - clusters))], axis=1)
    text = np.concatenate([onehot, 0.5 * rng.normal(size=(n_items, 12 - clusters))], axis=1)
    np.save(folder / "image_feat.npy", image.astype(np.float32))
    np.save(folder / "text_feat.npy", text.astype(np.float32))
    return path


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture
def restore_env():
    """In-process runs set RANK/MASTER_PORT/...: put the environment back afterwards (the
    single-process gloo group itself stays up for the rest of the session)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def in_process():
    """One torch thread (the runs are tiny; threads only contend) and the environment put back
    after a module's in-process runs (they set RANK/MASTER_PORT/...)."""
    import torch

    saved, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(saved)


def signal_during_epoch(monkeypatch, epoch: int):
    """SIGUSR1 to this process as stage 1's sampler starts ``epoch`` (the run then checkpoints
    after that epoch and raises Interrupted); returns the function that undoes it."""
    import signal

    from ptmrec_dist.train.sampler import BPRSampler

    epoch_of = BPRSampler.epoch

    def signalled(self, e):
        if e == epoch:
            os.kill(os.getpid(), signal.SIGUSR1)
        return epoch_of(self, e)

    monkeypatch.setattr(BPRSampler, "epoch", signalled)
    return lambda: monkeypatch.setattr(BPRSampler, "epoch", epoch_of)

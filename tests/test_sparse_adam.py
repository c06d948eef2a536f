"""``stage1.sparse_embeddings``: the lazy row-wise Adam (train/sparse_adam.py) against torch's Adam
and SparseAdam, and stage 1 with it: one optimizer step equals dense Adam's, only the touched rows
move, an interrupted run resumes exactly, two ranks equal one, and the settings it cannot run
under are refused naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset, signal_during_epoch
from run_fixtures import ptmrec, read_log

from ptmrec_dist.config import load_config
from ptmrec_dist.errors import ConfigError, Interrupted
from ptmrec_dist.train.sparse_adam import RowSparseAdam
from ptmrec_dist.train.stage1 import run_stage1

QUICK = ["stage1.epochs=6", "stage1.batch_size=64", "stage1.lr=0.01", "stage1.patience=100"]
RANDOM_RECALL20 = 20 / 52     # as tests/test_stage1.py: the tiny data's random ranking


def _steps(opt_cls, sparse: bool, wd: float = 0.0, steps: int = 5):
    """Train a 30 x 4 table and a dense 4-vector for a few steps of a fixed loss; returns both."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(30, 4))
    vec = torch.nn.Parameter(torch.randn(4))
    opt = opt_cls([table, vec], lr=0.05, **({"weight_decay": wd} if wd else {}))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, 12, (7,), generator=g)        # rows 12..29 never touched
        emb = F.embedding(rows, table, sparse=sparse)
        loss = ((emb * vec).sum(-1) - 1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.detach().clone(), vec.detach().clone(), opt


def test_dense_parameters_get_torch_adam():
    for wd in (0.0, 0.01):
        want_t, want_v, _ = _steps(torch.optim.Adam, sparse=False, wd=wd)
        got_t, got_v, _ = _steps(RowSparseAdam, sparse=False, wd=wd)
        torch.testing.assert_close(got_t, want_t, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_v, want_v, rtol=1e-6, atol=1e-7)


def test_sparse_rows_get_torch_sparse_adam():
    got_t, _, opt = _steps(RowSparseAdam, sparse=True)
    torch.manual_seed(0)
    start = torch.randn(30, 4)
    assert torch.equal(got_t[12:], start[12:])                  # untouched rows never move
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert not state["exp_avg"][12:].any() and not state["exp_avg_sq"][12:].any()
    assert not torch.equal(got_t[:12], start[:12])
    # a table alone (the vector fixed): the trajectory of torch's SparseAdam
    table = torch.nn.Parameter(start.clone())
    ref_table = torch.nn.Parameter(start.clone())
    vec = torch.randn(4, generator=torch.Generator().manual_seed(2))
    ours, ref = RowSparseAdam([table], lr=0.05), torch.optim.SparseAdam([ref_table], lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        rows = torch.randint(0, 12, (7,), generator=g)          # repeats: summed per row
        for t, o in ((table, ours), (ref_table, ref)):
            loss = ((F.embedding(rows, t, sparse=True) * vec).sum(-1) - 1).pow(2).sum()
            o.zero_grad()
            loss.backward()
            o.step()
    torch.testing.assert_close(table.detach(), ref_table.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(table.detach(), start)


def test_state_dict_round_trip():
    _, _, opt = _steps(RowSparseAdam, sparse=True, steps=3)
    sd = opt.state_dict()
    table = torch.nn.Parameter(torch.zeros(30, 4))
    vec = torch.nn.Parameter(torch.zeros(4))
    fresh = RowSparseAdam([table, vec], lr=0.05)
    fresh.load_state_dict(sd)
    assert float(fresh.state[table]["step"]) == 3
    torch.testing.assert_close(fresh.state[table]["exp_avg"],
                               opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])


# ------------------------------------------------------------------------------ stage 1

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("sparse") / "tiny")


def _cfg(data, name, *overrides):
    return load_config(None, [f"data.path={data}", f"recommender.name={name}", *QUICK,
                              *overrides])


@pytest.mark.parametrize("name", ["bpr", "vbpr"])
def test_one_step_equals_dense_adam_then_trains(name, data, in_process, tmp_path):
    """Adam's first step moves a row only where its gradient is non-zero, so one step of the
    lazy optimizer over one batch holding every training interaction is dense Adam's step."""
    one = ["stage1.epochs=1", "stage1.batch_size=100000"]
    dense = run_stage1(_cfg(data, name, *one), tmp_path / "dense", log=lambda *_: None)
    lines = []
    sparse = run_stage1(_cfg(data, name, *one, "stage1.sparse_embeddings=true"),
                        tmp_path / "sparse", log=lines.append)
    assert any("RowSparseAdam" in str(x) for x in lines), lines
    for f in ("user_repr.npy", "item_repr.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "sparse" / f),
                                   np.load(tmp_path / "dense" / f), rtol=1e-5, atol=1e-6)
    assert sparse["valid"] == pytest.approx(dense["valid"], abs=1e-9)
    m = run_stage1(_cfg(data, name, "stage1.sparse_embeddings=true"), tmp_path / "six",
                   log=lambda *_: None)
    assert m["test"]["recall@20"] > RANDOM_RECALL20 + 0.1, m["test"]


def test_signal_checkpoint_then_resume_is_exact(data, in_process, monkeypatch, tmp_path):
    """The lazy optimizer's moments travel in DeepSpeed's checkpoint: a run stopped after epoch
    2 and resumed ends with the uninterrupted run's models."""
    on = "stage1.sparse_embeddings=true"
    ref = run_stage1(_cfg(data, "vbpr", on), tmp_path / "ref", log=lambda *_: None)
    undo = signal_during_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted, match="after epoch 2"):
        run_stage1(_cfg(data, "vbpr", on), tmp_path / "r", log=lambda *_: None)
    undo()
    m = run_stage1(_cfg(data, "vbpr", on), tmp_path / "r", log=lambda *_: None, resume=True)
    assert (m["best_epoch"], m["valid"], m["test"]) == (ref["best_epoch"], ref["valid"],
                                                        ref["test"])
    for f in ("user_repr.npy", "item_repr.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "r" / f), np.load(tmp_path / "ref" / f))
    assert [r["loss"] for r in read_log(tmp_path / "r")] == \
        [r["loss"] for r in read_log(tmp_path / "ref")]


@pytest.mark.parametrize("override, message", [
    ("recommender.name=freedom", "freedom reads its tables whole"),
    ("stage1.ds_config=zero1", "ZeRO stage 1"),
    ("stage1.precision=bf16", "stage1.precision is bf16"),
    ("stage1.grad_clip=1.0", "stage1.grad_clip is 1.0"),
])
def test_settings_it_cannot_run_under_are_refused(override, message, data, in_process,
                                                  tmp_path):
    cfg = _cfg(data, "vbpr", "stage1.sparse_embeddings=true", override)
    with pytest.raises(ConfigError, match=message):
        run_stage1(cfg, tmp_path / "x", log=lambda *_: None)


def test_auto_takes_the_lazy_adam_from_a_catalog_size(data, in_process, monkeypatch, tmp_path):
    """``stage1.sparse_embeddings: auto`` (the default): dense Adam below SPARSE_AUTO_ITEMS
    items; from there the lazy one where it applies (the run ``true`` gives), and dense Adam
    with the reason, not an error, where it does not."""
    import ptmrec_dist.train.stage1 as stage1

    def run(name, *overrides):
        lines = []
        m = run_stage1(_cfg(data, "vbpr", "stage1.epochs=2", *overrides), tmp_path / name,
                       log=lines.append)
        return m, " | ".join(str(x) for x in lines)

    assert _cfg(data, "vbpr").stage1.sparse_embeddings == "auto"
    _, said = run("small")
    assert "RowSparseAdam" not in said and "sparse_embeddings auto" not in said
    monkeypatch.setattr(stage1, "SPARSE_AUTO_ITEMS", 10)
    auto, said = run("auto")
    assert "RowSparseAdam" in said and "sparse_embeddings auto:" in said, said
    on, _ = run("on", "stage1.sparse_embeddings=true")
    assert (auto["valid"], auto["test"]) == (on["valid"], on["test"])
    for f in ("user_repr.npy", "item_repr.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "auto" / f),
                                      np.load(tmp_path / "on" / f))
    _, said = run("zero1", "stage1.ds_config=zero1")
    assert "RowSparseAdam" not in said
    assert "sparse_embeddings auto: dense Adam" in said and "ZeRO stage 1" in said, said
    _, said = run("off", "stage1.sparse_embeddings=false")
    assert "RowSparseAdam" not in said


def test_two_ranks_equal_one_rank(data, tmp_path):
    """DeepSpeed all-reduces the sparse gradients (indices and values gathered, averaged): two
    ranks with the same global batches train the model one rank trains."""
    args = ["stage1", "--data", data, "--model", "vbpr", "stage1.epochs=3",
            "stage1.batch_size=64", "stage1.lr=0.01", "stage1.sparse_embeddings=true"]
    for ranks in (1, 2):
        proc = ptmrec(*args, "--out", tmp_path / f"r{ranks}", ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    two = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["best_epoch"] == one["best_epoch"]
    for f in ("user_repr.npy", "item_repr.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "r2" / f), np.load(tmp_path / "r1" / f),
                                   atol=1e-4)

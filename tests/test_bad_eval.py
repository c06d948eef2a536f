"""``ptmrec evaluate`` on bad or short input (issue 19): representations holding NaN or inf are
refused naming the file; ``--dump-topk`` on a catalog with fewer items left than K writes only
real items to ``.jsonl`` (never -1 looked up as an item id) and pads ``.npy`` with -1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptmrec_dist.cli import main


def _run(tmp_path, n_users=4, n_items=6, dim=3, csv=True):
    """A finished-run folder: interactions (raw string ids when ``csv``), representations."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for u in range(n_users):         # each user: 3 training items, 1 valid, 1 test
        items = [(u + j) % n_items for j in range(5)]
        rows += [(u, i, 0) for i in items[:3]] + [(u, items[3], 1), (u, items[4], 2)]
    (data / "t.inter").write_text("userID\titemID\tx_label\n" +
                                  "".join(f"{u}\t{i}\t{x}\n" for u, i, x in rows))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  path: {data / 't.inter'}\n")
    rng = np.random.default_rng(0)
    np.save(run / "user_repr.npy", rng.normal(size=(n_users, dim)).astype(np.float32))
    np.save(run / "item_repr.npy", rng.normal(size=(n_items, dim)).astype(np.float32))
    return run


@pytest.mark.parametrize("name, value", [("user_repr.npy", np.nan), ("item_repr.npy", np.inf)])
def test_non_finite_representations_are_refused_naming_the_file(tmp_path, capsys, name, value):
    run = _run(tmp_path)
    reps = np.load(run / name)
    reps[1, 2] = value
    np.save(run / name, reps)
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / name}" in err and "row 1" in err and "not finite" in err, err


def test_dump_topk_with_fewer_items_than_k_writes_only_real_items(tmp_path, capsys):
    """6 items, 3 of them masked as training items per user: 3 rankable, K = 50."""
    run = _run(tmp_path)
    assert main(["evaluate", "--run", str(run), "--dump-topk", str(tmp_path / "top.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert lines
    for rec in lines:
        assert len(rec["items"]) == 3 and all(0 <= i < 6 for i in rec["items"]), rec
        if "item_ids" in rec:
            assert rec["item_ids"] == [str(i) for i in rec["items"]], rec
    assert main(["evaluate", "--run", str(run), "--dump-topk", str(tmp_path / "top.npy")]) == 0
    top = np.load(tmp_path / "top.npy")
    assert top.shape == (len(lines), 1 + 50)
    assert (top[:, 1:4] >= 0).all() and (top[:, 4:] == -1).all()
    capsys.readouterr()


def test_evaluating_an_empty_split_is_refused(tmp_path, capsys):
    """``evaluate --split valid`` where no row is valid: exit 2 naming the interactions, not a
    table of 0.0."""
    run = _run(tmp_path)
    inter = tmp_path / "data" / "t.inter"
    inter.write_text(inter.read_text().replace("\t1\n", "\t0\n"))
    assert main(["evaluate", "--run", str(run), "--split", "valid"]) == 2
    err = capsys.readouterr().err
    assert str(inter) in err and "the valid split of these interactions is empty" in err, err

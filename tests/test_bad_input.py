"""Issue 19, "every bad input explained": each bad input below ends in exit code 2 with one
message naming the file (and the line, the config key, the dtype or the row where there is one),
never a traceback; and the inputs that only look odd (large raw ids, a byte-order mark, CRLF line
endings, anchors in a YAML file) just work."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset

from ptmrec_dist.cli import main
from ptmrec_dist.config import DataConfig, load_config, save_config
from ptmrec_dist.data.ingest import read_interactions
from ptmrec_dist.data.interactions import MAX_INDEX, load_interactions
from ptmrec_dist.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, newline="")
    return path


def quiet(_msg):
    pass


def cli(capsys, *args) -> tuple[int, str]:
    """``ptmrec ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command (there must be exactly one, no traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- ids and indices

def _limited_memory():
    limit = 4 << 30          # 4 GiB of address space: a 30 GiB allocation fails fast, no swap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_inter_index_beyond_the_bound_names_the_line(tmp_path):
    """A ``.inter`` file's ids are the indices: a user id of 4,000,000,000 once meant a 30 GiB
    ``bincount`` (MemoryError traceback, or swapping); now any index above ``MAX_INDEX`` is
    refused with file:line: field. Run as a child process under a memory limit, so that a
    regression fails here instead of exhausting the machine."""
    path = write(tmp_path / "big.inter", "userID\titemID\tx_label\n0\t1\t0\n4000000000\t1\t0\n")
    proc = subprocess.run([sys.executable, "-m", "ptmrec_dist", "stats", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          preexec_fn=_limited_memory)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert line.startswith(f"error: {path}:3: user: ")
    assert "4000000000" in line and f"{MAX_INDEX:,}" in line


@pytest.mark.parametrize("row, where", [
    ("12345678901234567890\t1\t0\n", "user"),     # 20 digits: beyond int64 (OverflowError)
    ("0\t99999999999999999999999\t0\n", "item"),
    ("0\t1\t00000000000000000000000000000000000000001\n", None),    # = 1: fine
    ("0\t1\t10000000000000000000\n", "x_label"),
])
def test_inter_ids_beyond_int64_name_the_line(tmp_path, capsys, row, where):
    """20-digit ids in a ``.inter`` file were an ``OverflowError`` traceback from numpy; now
    file:line: field (leading zeros do not count as digits)."""
    path = write(tmp_path / "d.inter", "userID\titemID\tx_label\n0\t2\t0\n" + row)
    code, err = cli(capsys, "stats", path, "--json")
    if where is None:
        assert code == 0, err
        return
    assert code == 2
    assert error_line(err).startswith(f"error: {path}:3: {where}: ")


def test_large_raw_ids_are_mapped_to_small_indices(tmp_path, capsys):
    """Where raw ids are mapped to indices (CSV interactions, ``ptmrec catalog``'s reader), a
    user id of 4,000,000,000 and a 20-digit item id are just ids: two users, two items."""
    big_user, big_item = "4000000000", "12345678901234567890"
    path = write(tmp_path / "big.csv",
                 f"user,item\n{big_user},{big_item}\n{big_user},7\n1,7\n1,{big_item}\n")
    code, err = cli(capsys, "stats", path, "--json")
    assert code == 0, err
    inter = load_interactions(path, warn=quiet)
    assert (inter.n_users, inter.n_items) == (2, 2)
    assert inter.user_ids.tolist() == ["1", big_user]
    assert inter.item_index([big_item, "7", "8"]).tolist() == [0, 1, -1]
    raw = read_interactions(write(tmp_path / "big.tsv", f"user_id\titem_id\n{big_user}\t"
                                                        f"{big_item}\n"))
    assert raw["users"].tolist() == [big_user] and raw["items"].tolist() == [big_item]


def test_item_lookup_of_a_huge_raw_id_in_an_index_file_is_unknown(tmp_path):
    """Looking a raw id up in a ``.inter`` file (ids are indices; ``ptmrec shard`` does it for
    every catalog item) overflowed on a 20-digit id; now it is simply unknown (-1)."""
    path = write(tmp_path / "d.inter", "userID\titemID\n0\t1\n1\t2\n")
    inter = load_interactions(path, warn=quiet)
    assert inter.item_index(["2", "12345678901234567890", "x"]).tolist() == [2, -1, -1]


# --------------------------------------------------------------------------- encodings

BOM = "\ufeff".encode()


def test_a_byte_order_mark_is_not_data(tmp_path, capsys):
    """A CSV saved with a UTF-8 byte-order mark (Excel does it) once turned its header into an
    interaction of user '\\ufeffuser'; a ``.inter`` with one lost its userID column. Read as
    utf-8-sig, both parse like the file without the mark."""
    plain = "user,item\na,b\na,c\nb,c\n"
    with_bom = write(tmp_path / "bom.csv", BOM + plain.encode())
    want = load_interactions(write(tmp_path / "plain.csv", plain), warn=quiet)
    got = load_interactions(with_bom, warn=quiet)
    assert got.user_ids.tolist() == ["a", "b"] and got.item_ids.tolist() == ["b", "c"]
    assert got.raw_rows == want.raw_rows == 3
    code, err = cli(capsys, "stats", with_bom, "--json")
    assert code == 0, err
    # no header: the first id keeps no mark either
    headless = load_interactions(write(tmp_path / "nh.csv", BOM + b"a,b\na,c\nb,c\n"), warn=quiet)
    assert headless.user_ids.tolist() == ["a", "b"]
    # .inter, through both the fast and the validating parser
    inter_text = "userID\titemID\tx_label\n0\t1\t0\n0\t2\t1\n1\t2\t0\n"
    for name, extra in (("fast.inter", ""), ("slow.inter", "\n\n")):   # blank lines: slow path
        got = load_interactions(write(tmp_path / name, BOM + (inter_text + extra).encode()),
                                warn=quiet)
        assert (got.n_users, got.n_items, got.raw_rows) == (2, 3, 3)
    # the catalog's reader (ptmrec catalog) already read utf-8-sig: kept so
    raw = read_interactions(write(tmp_path / "bom.tsv", BOM + b"user_id\titem_id\nu1\ti1\n"))
    assert raw["columns"]["user"] == "user_id" and raw["users"].tolist() == ["u1"]


@pytest.mark.parametrize("name, text", [
    ("h.csv", "user,item,timestamp\na,b,1\na,c,2\nb,c,3\nb,a,4\nc,a,5\n"),
    ("n.csv", "a,b\na,c\nb,c\n"),
    ("d.inter", "userID\titemID\ttimestamp\tx_label\n0\t1\t1.5\t0\n0\t2\t2\t1\n1\t2\t3\t0\n"),
    ("s.inter", "userID\titemID\tx_label\n0\t1\t0\n\n0\t2\t1\n1\t2\t0\n"),   # validating parser
])
def test_crlf_line_endings_parse_exactly_as_lf(tmp_path, name, text):
    """Windows line endings (CRLF) give exactly the rows, ids, timestamps and split of LF."""
    lf = load_interactions(write(tmp_path / "lf" / name, text), warn=quiet)
    crlf = load_interactions(write(tmp_path / "crlf" / name, text.replace("\n", "\r\n")),
                             warn=quiet)
    for attr in ("users", "items", "labels", "timestamps", "user_ids", "item_ids"):
        a, b = getattr(lf, attr), getattr(crlf, attr)
        assert (a is None) == (b is None), attr
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert (lf.n_users, lf.n_items, lf.raw_rows) == (crlf.n_users, crlf.n_items, crlf.raw_rows)
    tsv = text.replace(",", "\t") if name.endswith(".csv") and name.startswith("h") else None
    if tsv is not None:        # the catalog's reader too
        a = read_interactions(write(tmp_path / "lf" / "r.tsv", tsv.replace("user", "user_id")))
        b = read_interactions(write(tmp_path / "crlf" / "r.tsv",
                                    tsv.replace("user", "user_id").replace("\n", "\r\n")))
        assert a["users"].tolist() == b["users"].tolist()
        assert a["items"].tolist() == b["items"].tolist()
        np.testing.assert_array_equal(a["timestamps"], b["timestamps"])


# --------------------------------------------------------------------------- splits

def _rows(labels) -> str:
    """6 users x 5 items each (indices), ``labels(k)`` the x_label of the k-th row."""
    rows = [(u, i % 10) for u in range(6) for i in range(u, u + 5)]
    return "userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{labels(k)}\n"
                                                 for k, (u, i) in enumerate(rows))


def test_no_training_rows_is_refused_at_load_time(tmp_path, capsys, in_process):
    """A split with no training rows (every x_label 1 or 2) once ended, a whole DeepSpeed set-up
    later, in ``KeyError: 'loss'`` in stage 1 (and ``ptmrec stats`` showed an empty data set).
    Now loading it is an InputError naming the file and saying the train split is empty."""
    path = write(tmp_path / "notrain.inter", _rows(lambda k: 1 if k % 2 else 2))
    code, err = cli(capsys, "stats", path)
    assert code == 2
    assert error_line(err).startswith(f"error: {path}: the train split is empty")
    code, err = cli(capsys, "stage1", "--data", path, "--model", "bpr", "--out", tmp_path / "r",
                    "stage1.epochs=2")
    assert code == 2
    assert error_line(err).startswith(f"error: {path}: the train split is empty")


NO_VALID = _rows(lambda k: 0 if k % 5 else 2)


def test_no_valid_rows_is_refused_where_valid_chooses_the_epoch(tmp_path, capsys):
    """An empty valid split gave stage 1 silent 0.0 valid metrics, and early stopping kept
    epoch 0 on them. A training run's loader (``need_valid=True``) refuses it, naming the file;
    ``stats`` and ``evaluate --split test`` (which do not need valid) keep working."""
    path = write(tmp_path / "novalid.inter", NO_VALID)
    with pytest.raises(InputError) as exc:
        load_interactions(path, DataConfig(), warn=quiet, need_valid=True)
    assert str(exc.value).startswith(f"{path}: no valid interactions")
    assert "nothing can choose the epoch" in str(exc.value)
    assert load_interactions(path, warn=quiet).split_counts()["valid"] == 0
    code, err = cli(capsys, "stats", path)
    assert code == 0, err
    # evaluate --split test of a finished run on these interactions
    inter = load_interactions(path, warn=quiet)
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, [f"data.path={path}"]), run)
    rng = np.random.default_rng(0)
    np.save(run / "user_repr.npy", rng.normal(size=(inter.n_users, 4)).astype(np.float32))
    np.save(run / "item_repr.npy", rng.normal(size=(inter.n_items, 4)).astype(np.float32))
    code, err = cli(capsys, "evaluate", "--run", run, "--split", "test", "--json")
    assert code == 0, err


def test_stage1_refuses_an_empty_valid_split(tmp_path, capsys, in_process):
    """Stage 1 chooses its epoch on valid: with no valid rows it exits 2 naming the file,
    before any training (today it trains and keeps epoch 0 on 0.0 metrics)."""
    path = write(tmp_path / "novalid.inter", NO_VALID)
    code, err = cli(capsys, "stage1", "--data", path, "--model", "bpr", "--out", tmp_path / "r",
                    "stage1.epochs=2")
    assert code == 2
    assert error_line(err).startswith(f"error: {path}: no valid interactions")


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("text, line, key", [
    ("seed: 1\nstage1:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n", 5, "stage1.epochs"),
    ("seed: 1\nstage1:\n  epochs: 3\nseed: 2\n", 4, "seed"),
    ("stage1: {epochs: 3}\nstage2:\n  epochs: 2\nstage1:\n  lr: 0.1\n", 4, "stage1"),
    ("tune:\n  search:\n    a: [1, 2]\n    a: [3]\n", 4, "tune.search.a"),
])
def test_a_yaml_key_given_twice_names_file_line_and_key(tmp_path, capsys, text, line, key):
    """A YAML file with the same key twice at any depth (the last silently won) is a
    ConfigError naming the file, the line of the second occurrence and the dotted key."""
    path = write(tmp_path / "c.yaml", text)
    code, err = cli(capsys, "config", "--config", path)
    assert code == 2
    msg = error_line(err)
    assert msg.startswith(f"error: {path}:{line}: ")
    assert f"'{key}'" in msg and "more than once" in msg


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    """Anchors and ``<<`` merge keys are not duplicates: a key written next to a merge overrides
    the merged one, as YAML defines it."""
    path = write(tmp_path / "m.yaml", "stage1: &s1\n  epochs: 3\n  batch_size: 64\n"
                                      "stage2:\n  <<: *s1\n  epochs: 5\n")
    cfg = load_config(path)
    assert (cfg.stage1.epochs, cfg.stage1.batch_size) == (3, 64)
    assert (cfg.stage2.epochs, cfg.stage2.batch_size) == (5, 64)


# --------------------------------------------------------------------------- features

@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny", n_users=30, n_items=20, per_user=6)


@pytest.mark.parametrize("bad, dtype", [
    (lambda a: a.astype(str), "<U"),                                   # numbers as text
    (lambda a: np.where(a > 1, "x", a.astype(str)), "<U"),
    (lambda a: a.astype(object), "object"),
    (lambda a: a + 1j, "complex128"),                                  # imaginary part
])
def test_features_of_a_non_real_dtype_name_file_and_dtype(tiny, tmp_path, capsys, in_process,
                                                           bad, dtype):
    """``image.npy`` of strings was a ``ValueError`` traceback (or, numeric text, silently
    parsed), of objects an unreadable-array message without the dtype, of complex numbers
    silently stripped of its imaginary part. Each is an InputError naming file and dtype."""
    path = tiny.parent / "image_feat.npy"
    np.save(path, bad(np.load(path).astype(np.float64)), allow_pickle=True)
    code, err = cli(capsys, "stage1", "--data", tiny, "--model", "vbpr", "--out", tmp_path / "r",
                    "stage1.epochs=1")
    assert code == 2
    msg = error_line(err)
    assert msg.startswith(f"error: {path}: ") and dtype in msg


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_file_and_row(tiny, tmp_path, capsys, in_process, value):
    """NaN or inf in item features: an InputError naming the file and the first bad row
    (already so before issue 19; kept)."""
    path = tiny.parent / "text_feat.npy"
    feats = np.load(path)
    feats[7, 3] = value
    feats[11, 0] = value
    np.save(path, feats)
    code, err = cli(capsys, "stage1", "--data", tiny, "--model", "vbpr", "--out", tmp_path / "r",
                    "stage1.epochs=1")
    assert code == 2
    assert error_line(err).startswith(f"error: {path}: row 7 ")


# --------------------------------------------------------------------------- stage 2 inputs

@pytest.fixture(scope="module")
def teacher(tmp_path_factory, in_process):
    """A one-epoch vbpr stage-1 run on tiny data: ``(interactions, run folder)``."""
    from ptmrec_dist.train.stage1 import run_stage1

    base = tmp_path_factory.mktemp("teacher")
    data = make_tiny_dataset(base / "data", n_users=30, n_items=20, per_user=6)
    cfg = load_config(None, [f"data.path={data}", "recommender.name=vbpr", "stage1.epochs=1"])
    run_stage1(cfg, base / "run", log=quiet)
    return data, base / "run"


def _shards(folder: Path, n_items: int, interactions: Path | None) -> Path:
    from ptmrec_dist.data.shards import FORMAT, MANIFEST
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "n_items": n_items, "n_written": n_items, "n_missing": 0,
        "interactions": str(interactions) if interactions else None, "shards": []}))
    return folder


def _stage2(capsys, data: Path, teacher_run: Path, shards: Path, out: Path):
    return cli(capsys, "stage2", "--data", data, "--teacher", teacher_run, "--shards", shards,
               "--out", out, "recommender.name=vbpr", "backbone.name_or_path=/nonexistent")


def _copy_data(data: Path, folder: Path, keep_line=lambda line: True) -> Path:
    """The tiny data set (features included) in ``folder``, its rows filtered by ``keep_line``."""
    shutil.copytree(data.parent, folder)
    lines = data.read_text().splitlines(keepends=True)
    (folder / data.name).write_text(lines[0] + "".join(ln for ln in lines[1:] if keep_line(ln)))
    return folder / data.name


def test_a_teacher_from_other_data_names_both_counts_and_paths(teacher, tmp_path, capsys):
    """Stage 2 whose teacher was trained on other interactions (another user count) failed with
    a ``RuntimeError: size mismatch`` traceback when the teacher's weights were loaded; now
    exit 2 naming both counts and both paths, before anything is built."""
    data, run = teacher
    fewer = _copy_data(data, tmp_path / "fewer", lambda ln: int(ln.split("\t")[0]) < 25)
    shards = _shards(tmp_path / "shards", 20, fewer)
    code, err = _stage2(capsys, fewer, run, shards, tmp_path / "out")
    assert code == 2
    msg = error_line(err)
    assert str(run / "user_repr.npy") in msg and str(fewer) in msg
    assert "30 users" in msg and "25 users" in msg


@pytest.mark.parametrize("name, row", [("user_repr.npy", 4), ("item_repr.npy", 13)])
def test_non_finite_teacher_representations_are_refused_before_training(
        teacher, tmp_path, capsys, name, row):
    """NaN/inf in the teacher's exported representations went unchecked into the KT targets;
    now an InputError naming the file and the first bad row, before anything is built."""
    data, run = teacher
    bad = tmp_path / "teacher"
    shutil.copytree(run, bad)
    reps = np.load(bad / name)
    reps[row, 1] = np.nan
    reps[row + 1, 0] = np.inf
    np.save(bad / name, reps)
    code, err = _stage2(capsys, data, bad, _shards(tmp_path / "shards", 20, data),
                        tmp_path / "out")
    assert code == 2
    assert error_line(err).startswith(f"error: {bad / name}: row {row} ")


def test_stage2_refuses_an_empty_valid_split(teacher, tmp_path, capsys):
    """Stage 2 chooses its epoch on valid too: no valid rows, exit 2 naming the file."""
    data, run = teacher
    novalid = _copy_data(data, tmp_path / "novalid", lambda ln: not ln.endswith("\t1\n"))
    code, err = _stage2(capsys, novalid, run, _shards(tmp_path / "shards", 20, novalid),
                        tmp_path / "out")
    assert code == 2
    assert error_line(err).startswith(f"error: {novalid}: no valid interactions")


@pytest.mark.parametrize("n_items, recorded", [(25, True), (15, True), (25, False)])
def test_shards_of_another_item_count_are_refused(teacher, tmp_path, capsys, n_items,
                                                  recorded):
    """Shards written for another item index (their manifest's ``n_items``) were not checked
    against the interactions; now exit 2 naming the manifest, the interactions and both counts.
    (Shards written without interactions may cover fewer items: their ids are the indices.)"""
    data, run = teacher
    shards = _shards(tmp_path / "shards", n_items, data if recorded else None)
    code, err = _stage2(capsys, data, run, shards, tmp_path / "out")
    assert code == 2
    msg = error_line(err)
    assert msg.startswith(f"error: {shards / 'manifest.json'}: ")
    assert f"{n_items} items" in msg and "20 items" in msg and str(data) in msg

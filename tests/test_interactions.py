import json

import numpy as np
import pytest

from conftest import shared_dataset
from hypothesis import HealthCheck, given, settings, strategies as st

from ptmrec_dist.cli import main
from ptmrec_dist.config import DataConfig
from ptmrec_dist.data.interactions import find_interactions_file, load_interactions
from ptmrec_dist.data.splits import holdout_sizes, leave_last_out_labels, random_split_labels
from ptmrec_dist.errors import InputError



@pytest.fixture
def baby():
    """The real Amazon Baby interactions, beside the checkout (skipped in a user's clone without
    it; required in CI)."""
    folder = shared_dataset("amazon-baby")
    assert (folder / "baby.inter").is_file(), f"baby.inter not found in {folder}"
    return folder


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def quiet(_msg):
    pass


@pytest.mark.shared_data
def test_amazon_baby_counts(baby):
    inter = load_interactions(baby, warn=quiet)
    stats = inter.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (19445, 7050, 160792)
    assert stats["splits"] == {"train": 119674, "valid": 20559, "test": 20559}
    assert stats["split_rule"] == "x_label"
    assert inter.train.shape == (19445, 7050) and inter.train.nnz == 119674
    assert inter.valid.nnz == 20559 and inter.test.nnz == 20559


@pytest.mark.shared_data
def test_random_rule_reproduces_mmrec_per_user_counts(baby):
    """MMRec's released split has, per user, max(1, n // 10) valid and as many test rows."""
    given_split = load_interactions(baby, warn=quiet)
    ours = load_interactions(baby, DataConfig(split="random", split_seed=3), warn=quiet)
    assert ours.split_rule == "random"
    for split in ("train", "valid", "test"):
        a = np.asarray(given_split.csr(split).sum(1)).ravel()
        b = np.asarray(ours.csr(split).sum(1)).ravel()
        np.testing.assert_array_equal(a, b)
    # same per-user counts, different items held out
    assert (given_split.test != ours.test).nnz > 0


@pytest.mark.shared_data
def test_stats_cli_json(baby, capsys):
    assert main(["stats", str(baby), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 19445 and stats["splits"]["valid"] == 20559


def test_holdout_rule_by_hand():
    np.testing.assert_array_equal(holdout_sizes([1, 2, 3, 5, 9, 10, 19, 20, 125]),
                                  [0, 0, 1, 1, 1, 1, 1, 2, 12])
    users = np.repeat(np.arange(4), [2, 3, 12, 25])
    labels = random_split_labels(users, seed=0)
    per = lambda u, k: int(((users == u) & (labels == k)).sum())
    assert [per(0, 0), per(0, 1), per(0, 2)] == [2, 0, 0]        # too short to hold out
    assert [per(1, 0), per(1, 1), per(1, 2)] == [1, 1, 1]        # n-2/1/1
    assert [per(2, 0), per(2, 1), per(2, 2)] == [10, 1, 1]
    assert [per(3, 0), per(3, 1), per(3, 2)] == [21, 2, 2]
    np.testing.assert_array_equal(labels, random_split_labels(users, seed=0))
    assert not np.array_equal(labels, random_split_labels(users, seed=1))


def test_leave_last_out_by_timestamp(tmp_path):
    path = write(tmp_path, "d.inter", "userID\titemID\ttimestamp\n"
                 "0\t0\t5\n0\t1\t1\n0\t2\t3\n0\t3\t2\n"     # latest: item 0, then item 2
                 "1\t0\t1\n1\t1\t1\n1\t2\t1\n"              # ties: file order decides
                 "2\t4\t9\n2\t3\t8\n")                      # 2 rows: all train
    inter = load_interactions(path, DataConfig(split="loo"), warn=quiet)
    test, valid = inter.test.toarray(), inter.valid.toarray()
    assert test[0].nonzero()[0].tolist() == [0] and valid[0].nonzero()[0].tolist() == [2]
    assert test[1].nonzero()[0].tolist() == [2] and valid[1].nonzero()[0].tolist() == [1]
    assert inter.train[2].nnz == 2 and test[2].sum() == 0
    np.testing.assert_array_equal(leave_last_out_labels([0, 0, 0], [3, 2, 1]), [2, 1, 0])


def test_inter_with_mmrec_header_and_optional_columns(tmp_path):
    path = write(tmp_path, "x.inter", "userID:token\titemID:token\trating:float\ttimestamp:float"
                 "\tx_label:token\r\n0\t1\t5.0\t100\t0\r\n0\t2\t4\t101\t0\r\n\n1\t2\t3\t99\t0\r\n"
                 "1\t0\t1\t98\t1\n0\t0\t2\t97\t2\n")
    inter = load_interactions(path, warn=quiet)
    assert (inter.n_users, inter.n_items) == (2, 3)
    assert inter.split_counts() == {"train": 3, "valid": 1, "test": 1}
    assert inter.train.toarray().tolist() == [[0, 1, 1], [0, 0, 1]]
    assert inter.timestamps.tolist() == [100, 101, 99, 98, 97]


def test_csv_raw_ids_are_mapped_and_saved(tmp_path):
    path = write(tmp_path, "d.csv", "user,item,timestamp\nbob,B07,3\namy,A01,1\nbob,A01,2\n"
                 "amy,C9,5\namy,B07,4\n")
    inter = load_interactions(path, DataConfig(split="random"), warn=quiet)
    assert inter.user_ids.tolist() == ["amy", "bob"]
    assert inter.item_ids.tolist() == ["A01", "B07", "C9"]
    assert inter.item_index(["C9", "A01", "nope"]).tolist() == [2, 0, -1]
    full = (inter.train + inter.valid + inter.test).toarray()
    assert full.tolist() == [[1, 1, 1], [1, 1, 0]]
    written = inter.save_mappings(tmp_path / "maps")
    assert [p.name for p in written] == ["user_mapping.tsv", "item_mapping.tsv"]
    assert (tmp_path / "maps" / "item_mapping.tsv").read_text().splitlines() == \
        ["item_id\titem_index", "A01\t0", "B07\t1", "C9\t2"]
    headerless = write(tmp_path, "h.csv", "bob,B07\namy,A01\n")
    assert load_interactions(headerless, warn=quiet).n_items == 2


def test_duplicates_are_reported_and_removed(tmp_path):
    path = write(tmp_path, "d.inter", "userID\titemID\tx_label\n0\t1\t0\n0\t1\t0\n0\t2\t0\n"
                 "0\t1\t1\n0\t3\t0\n")
    notes = []
    inter = load_interactions(path, warn=notes.append)
    assert inter.duplicates_removed == 2 and inter.raw_rows == 5
    assert len(inter.users) == 3 and inter.split_counts()["valid"] == 0   # first occurrence kept
    assert any("2 duplicate (user, item) rows removed, first at line 3" in n for n in notes)


def test_users_without_train_are_dropped_from_eval(tmp_path):
    path = write(tmp_path, "d.inter", "userID\titemID\tx_label\n0\t0\t0\n0\t1\t2\n"
                 "1\t0\t1\n1\t1\t2\n")
    notes = []
    inter = load_interactions(path, warn=notes.append)
    assert inter.dropped_eval == 2
    assert inter.split_counts() == {"train": 1, "valid": 0, "test": 1}
    assert "2 valid/test interactions of 1 users with no training interaction" in notes[0]


@pytest.mark.parametrize("body, needle", [
    ("0\t1\t0\n0\t2\n", "d.inter:3: expected 3 tab-separated fields"),
    ("0\t1\t0\nx\t2\t0\n", "d.inter:3: user: expected a non-negative integer, got 'x'"),
    ("0\t1\t0\n0\t-2\t0\n", "d.inter:3: item: expected a non-negative integer, got '-2'"),
    ("0\t1\t0\n0\t2\t7\n", "d.inter:3: x_label: unknown x_label 7 (0 train, 1 valid, 2 test)"),
    ("0\t1\t0\n\n0\t2\t\n", "d.inter:4: x_label: expected an x_label of 0, 1 or 2, got ''"),
    ("", "d.inter: no data rows"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, body, needle):
    path = write(tmp_path, "d.inter", "userID\titemID\tx_label\n" + body)
    with pytest.raises(InputError) as exc:
        load_interactions(path, warn=quiet)
    assert needle in str(exc.value)


def test_bad_timestamp_and_missing_columns(tmp_path):
    path = write(tmp_path, "t.csv", "user,item,timestamp\na,b,1\na,c,soon\n")
    with pytest.raises(InputError, match=r"t.csv:3: timestamp: expected a finite number, got 'soon'"):
        load_interactions(path, warn=quiet)
    path = write(tmp_path, "m.inter", "userID\tfoo\n1\t2\n")
    with pytest.raises(InputError, match="missing column 'item'"):
        load_interactions(path, warn=quiet)
    path = write(tmp_path, "n.inter", "userID\titemID\n1\t2\n")
    with pytest.raises(InputError, match="data.split=loo needs a timestamp column"):
        load_interactions(path, DataConfig(split="loo"), warn=quiet)
    with pytest.raises(InputError, match="has no x_label column"):
        load_interactions(path, DataConfig(split="x_label"), warn=quiet)


def test_cli_bad_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, "d.inter", "userID\titemID\n0\t1\n0\tz\n")
    assert main(["stats", str(path)]) == 2
    assert f"error: {path}:3: item: expected a non-negative integer, got 'z'" in \
        capsys.readouterr().err


def test_find_interactions_file(tmp_path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a", "x_mapping.csv", "a\tb\n")
    write(tmp_path / "a", "d.inter", "userID\titemID\n0\t0\n")
    assert find_interactions_file(tmp_path / "a").name == "d.inter"
    write(tmp_path / "a", "e.inter", "userID\titemID\n0\t0\n")
    with pytest.raises(InputError, match="several interaction files"):
        find_interactions_file(tmp_path / "a")
    with pytest.raises(InputError, match="no such file"):
        find_interactions_file(tmp_path / "nope")


lines = st.lists(st.lists(st.sampled_from(["0", "1", "2", "17", "x", "", "-1", " 3", "2.5",
                                            "\u00e9", "3\r"]), min_size=0, max_size=4),
                 min_size=0, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines, st.sampled_from(["auto", "random"]))
def test_fuzz_parser_only_raises_input_errors(tmp_path, rows, split):
    path = tmp_path / "f.inter"
    path.write_text("userID\titemID\tx_label\n" + "\n".join("\t".join(r) for r in rows))
    try:
        inter = load_interactions(path, DataConfig(split=split), warn=quiet)
    except InputError as exc:
        assert str(exc).startswith(str(path))
        return
    assert len(inter.users) == inter.train.nnz + inter.valid.nnz + inter.test.nnz


valid_rows = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40), st.integers(0, 2),
                                st.floats(-1e6, 1e9, allow_nan=False), st.booleans()),
                      min_size=1, max_size=40)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_rows, st.booleans())
def test_fast_and_validating_parsers_agree(tmp_path, rows, crlf):
    from ptmrec_dist.data.interactions import parse_interactions as _parse
    eol = "\r\n" if crlf else "\n"
    body = "".join(f"{u}\t{i}\t{x}\t{t!r}{eol}" + (eol if blank else "")
                   for u, i, x, t, blank in rows)
    path = tmp_path / "p.inter"
    path.write_text(f"userID\titemID\tx_label\ttimestamp{eol}" + body, newline="")
    fast, slow = _parse(path), _parse(path, fast=False)
    assert fast.line_no is None and slow.line_no is not None   # both paths really ran
    for name in ("users", "items", "labels", "timestamps"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    assert (fast.n_users, fast.n_items, fast.raw_rows) == (slow.n_users, slow.n_items, slow.raw_rows)


def test_empty_and_header_only_files(tmp_path):
    for text, needle in (("", "empty file"), ("userID\titemID\n", "no data rows"),
                         ("\n\n", "empty file")):
        path = write(tmp_path, "e.inter", text)
        with pytest.raises(InputError, match=needle):
            load_interactions(path, warn=quiet)


# ------------------------------------------------------------ the catalog owns the item index

def catalog_folder(tmp_path, n_items=8):
    """A `ptmrec catalog`-style folder: catalog.json (n_items) + interactions.inter that
    holds only items 0..3."""
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "catalog.json").write_text(json.dumps({"items": n_items}))
    rows = [(u, i) for u in range(4) for i in range(4)]
    write(folder, "interactions.inter",
          "userID:token\titemID:token\n" + "".join(f"{u}\t{i}\n" for u, i in rows))
    return folder


def test_catalog_beside_the_interactions_owns_the_item_count(tmp_path):
    inter = load_interactions(catalog_folder(tmp_path), warn=quiet)
    assert inter.n_items == 8 and inter.csr("train").shape[1] == 8
    assert inter.stats()["items_with_interactions"] == 4


def test_a_subset_elsewhere_takes_the_item_count_from_data_catalog(tmp_path):
    folder = catalog_folder(tmp_path)
    sub = write(tmp_path, "sub.inter", "userID\titemID\n0\t1\n1\t3\n2\t0\n")
    assert load_interactions(sub, warn=quiet).n_items == 4          # no catalog: the file's
    assert load_interactions(sub, DataConfig(catalog=str(folder)), warn=quiet).n_items == 8


def test_an_index_outside_the_catalog_names_the_line(tmp_path):
    folder = catalog_folder(tmp_path, n_items=3)
    with pytest.raises(InputError) as e:
        load_interactions(folder, warn=quiet)
    msg = str(e.value)
    assert "interactions.inter:5:" in msg and "item index 3 is outside the catalog" in msg and "3 items" in msg


def test_raw_ids_against_a_catalog_index_are_refused(tmp_path):
    folder = catalog_folder(tmp_path)
    csv = write(tmp_path, "raw.csv", "user,item\nu1,a\nu2,b\n")
    with pytest.raises(InputError, match="raw item ids, but the catalog"):
        load_interactions(csv, DataConfig(catalog=str(folder)), warn=quiet)


def test_a_broken_catalog_summary_is_named(tmp_path):
    folder = catalog_folder(tmp_path)
    (folder / "catalog.json").write_text('{"users": 3}')
    with pytest.raises(InputError, match="catalog.json"):
        load_interactions(folder, warn=quiet)


def test_subset_features_of_the_whole_catalog_load(tmp_path):
    from ptmrec_dist.rec.features import resolve_features
    folder = catalog_folder(tmp_path)
    np.save(folder / "text.npy", np.ones((8, 3), np.float32))
    sub = write(tmp_path, "sub.inter", "userID\titemID\n0\t1\n1\t3\n2\t0\n")
    cfg = DataConfig(catalog=str(folder), features=str(folder))
    inter = load_interactions(sub, cfg, warn=quiet)
    assert resolve_features(cfg, inter.path, inter.n_items, required=True).text.shape == (8, 3)
    with pytest.raises(InputError, match="set data.catalog"):   # without it: refused, with a hint
        resolve_features(DataConfig(features=str(folder)), sub, 4, required=True)


# ------------------------------------------------------------ data.subsample

def test_subsample_keeps_a_seeded_fraction_per_user_with_a_floor(tmp_path):
    from ptmrec_dist.data.splits import subsample_per_user
    users = np.repeat(np.arange(4), [3, 10, 40, 100])
    keep = subsample_per_user(users, 0.1, seed=1)
    assert np.bincount(users[keep]).tolist() == [3, 5, 5, 10]     # all / floor 5 / 10 %
    assert np.array_equal(keep, subsample_per_user(users, 0.1, seed=1))
    assert not np.array_equal(keep, subsample_per_user(users, 0.1, seed=2))
    assert np.all(np.diff(keep) > 0)


def test_subsample_in_the_loader_redraws_the_split(tmp_path):
    rows = "".join(f"{u}\t{i}\t0\n" for u in range(6) for i in range(30))
    path = write(tmp_path, "x.inter", "userID\titemID\tx_label\n" + rows)
    inter = load_interactions(path, DataConfig(subsample=0.5, split="random"), warn=quiet)
    assert len(inter.users) == 6 * 15 and inter.stats()["subsampled_out"] == 90
    assert inter.split_counts()["valid"] == 6 and inter.split_counts()["test"] == 6
    auto = load_interactions(path, DataConfig(subsample=0.5), warn=quiet)   # auto -> random
    assert auto.split_rule == "random" and np.array_equal(auto.labels, inter.labels)
    with pytest.raises(InputError, match="data.subsample < 1 draws a new split"):
        load_interactions(path, DataConfig(subsample=0.5, split="x_label"), warn=quiet)


def test_non_ascii_rows_never_reach_numpys_reader(tmp_path, monkeypatch):
    """numpy 2.4's C reader crashed the process (a segmentation fault, about 2 runs in 3) on
    this row, found by tests/test_fuzz.py: non-ASCII files go to the validating parser, which
    names the line; the fast path still takes numeric files with a byte-order mark."""
    import ptmrec_dist.data.interactions as interactions

    path = tmp_path / "f.inter"
    path.write_bytes("userID\titemID\tx_label\n\U0008b153\U000ce0da\U0005bd6f\u00ff\t-4568\t0\n"
                     "1\t2\t0\n".encode("utf-8"))
    calls = []
    real = interactions.np.loadtxt
    monkeypatch.setattr(interactions.np, "loadtxt",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(InputError, match=r"f\.inter:2: user"):
        load_interactions(path, DataConfig(), warn=lambda _m: None)
    assert not calls
    ok = tmp_path / "ok.inter"
    ok.write_bytes(b"\xef\xbb\xbfuserID\titemID\tx_label\r\n0\t1\t0\r\n0\t2\t1\r\n0\t3\t2\r\n")
    assert interactions.parse_interactions(ok).line_no is None and calls      # fast path ran

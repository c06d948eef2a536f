"""``ptmrec diagnose``: linear CKA, the co-interaction AUC, the pair sampler, the ridge probe, and
the whole command on the small demo (docs/diagnose.md)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ortho_group

from ptmrec_dist.cli import main
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.diagnose import OUTPUT, auc, cointeraction_pairs, diagnose_run, \
    format_diagnosis, linear_cka, probe_split, random_pairs, ridge_probe
from ptmrec_dist.errors import InputError


def _hsic_cka(x, y):
    """The O(N^2) definition: HSIC with linear kernels and the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


# --------------------------------------------------------------------------- CKA
def test_cka_is_one_for_identical_rotated_scaled_and_shifted_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    q = ortho_group.rvs(12, random_state=1)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-12)   # columns are centred
    # float16 features (what extract stores) against float32 representations
    assert linear_cka(x.astype(np.float16), x.astype(np.float32)) == pytest.approx(1.0, abs=1e-6)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling_not_to_anisotropic():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 10)), rng.normal(size=(400, 6))
    y = y + x[:, :6] * 0.8                       # related: CKA well inside (0, 1)
    base = linear_cka(x, y)
    assert 0.1 < base < 0.95
    qx, qy = ortho_group.rvs(10, random_state=2), ortho_group.rvs(6, random_state=3)
    assert linear_cka(3 * x @ qx, y @ qy * 0.01) == pytest.approx(base, rel=1e-10)
    stretched = x * np.r_[10.0, np.ones(9)]      # not isotropic: CKA changes
    assert abs(linear_cka(stretched, y) - base) > 1e-3


def test_cka_near_zero_for_independent_matrices_with_many_rows():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20000, 8)), rng.normal(size=(20000, 16))
    assert linear_cka(x, y) < 0.01
    # the statistic does see dependence at the same size
    assert linear_cka(x, np.c_[x[:, :4], y[:, 4:]]) > 0.2


def test_cka_matches_the_hsic_formula_and_chunks_change_nothing():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 7))
    y = np.tanh(x @ rng.normal(size=(7, 5))) + 0.5 * rng.normal(size=(50, 5))
    want = _hsic_cka(x, y)
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-10)
    assert linear_cka(x, y, chunk=7) == pytest.approx(want, rel=1e-10)
    assert linear_cka(np.ones((50, 3)), y) is None       # a constant side: undefined


# --------------------------------------------------------------------------- AUC
def _brute_auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def test_auc_is_the_exact_pairwise_count_with_ties_half():
    rng = np.random.default_rng(4)
    for _ in range(20):
        n_pos, n_neg = rng.integers(1, 60, size=2)
        pos = rng.integers(0, 6, size=n_pos) / 5.0        # many ties, also across the groups
        neg = rng.integers(0, 6, size=n_neg) / 5.0
        assert auc(pos, neg) == _brute_auc(pos, neg)      # exactly, not approximately
    assert auc([1, 2, 3], [0, 0]) == 1.0
    assert auc([0, 0], [1, 2, 3]) == 0.0
    assert auc([1, 1], [1, 1, 1]) == 0.5


# --------------------------------------------------------------------------- pairs
def _inter_file(tmp_path: Path) -> Path:
    """Items 0-4 co-occur only in training; items 10-13 only through valid/test rows (user 0
    has 10 in valid, 11 in test; users 1-3 each have one of 12, 13 in valid/test beside their
    training items)."""
    rows = ["userID\titemID\tx_label"]
    train = {0: [0, 1, 2], 1: [2, 3], 2: [4, 0], 3: [1, 3, 4], 4: [5]}
    for u, items in train.items():
        rows += [f"{u}\t{i}\t0" for i in items]
    rows += ["0\t10\t1", "0\t11\t2", "1\t12\t1", "2\t13\t2", "3\t12\t2", "3\t13\t1"]
    path = tmp_path / "inter.inter"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_pairs_share_a_training_user_and_never_come_from_valid_or_test(tmp_path):
    inter = load_interactions(_inter_file(tmp_path), warn=lambda _m: None)
    i, j = cointeraction_pairs(inter, 5000, np.random.default_rng(0))
    train = inter.csr("train")
    co = (train.T @ train).toarray()
    assert (i != j).all()
    assert (co[i, j] > 0).all(), "a pair without a common training user"
    assert set(np.r_[i, j]) == {0, 1, 2, 3, 4}             # every eligible item shows up
    # with every split, items 10-13 would pair (10-11 via user 0, 12-13 via user 3, 10-0 ...);
    # item 5 (user 4's only item) pairs with nothing
    whole = inter.csr("train") + inter.csr("valid") + inter.csr("test")
    co_all = (whole.T @ whole).toarray()
    assert co_all[10, 11] and co_all[12, 13] and co_all[10, 0]
    # seeded: the same stream gives the same pairs
    i2, j2 = cointeraction_pairs(inter, 5000, np.random.default_rng(0))
    assert (i == i2).all() and (j == j2).all()


def test_random_pairs_are_distinct_and_cover_the_items():
    i, j = random_pairs(7, 20000, np.random.default_rng(1))
    assert (i != j).all() and set(i) == set(j) == set(range(7))
    counts = np.bincount(j, minlength=7) / len(j)
    assert np.abs(counts - 1 / 7).max() < 0.02


def test_no_cointeraction_is_an_input_error(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("userID\titemID\tx_label\n0\t0\t0\n1\t1\t0\n1\t2\t1\n")
    inter = load_interactions(path, warn=lambda _m: None)
    with pytest.raises(InputError, match="co-interacted"):
        cointeraction_pairs(inter, 10, np.random.default_rng(0))


# --------------------------------------------------------------------------- probe
def test_probe_is_high_on_features_that_encode_the_attribute_and_chance_on_noise():
    rng = np.random.default_rng(5)
    n, k = 2000, 4
    labels = rng.integers(k, size=n)
    train, test = probe_split(n, np.random.default_rng(6))
    assert len(test) == 400 and len(set(train) | set(test)) == n and not set(train) & set(test)
    noise = rng.normal(size=(n, 32))
    encoded = np.eye(k)[labels] @ rng.normal(size=(k, 32)) * 2.0 + noise
    assert ridge_probe(encoded, labels, train, test) > 0.9
    assert abs(ridge_probe(noise, labels, train, test) - 1 / k) < 0.08
    # scale does not matter (lambda is relative to the features' own spectrum)
    assert ridge_probe(encoded * 1e-3, labels, train, test) == \
        ridge_probe(encoded, labels, train, test)
    # all-zero features (missing items) predict the majority class, no crash
    assert 0 < ridge_probe(np.zeros((n, 4)), labels, train, test) < 0.5


# --------------------------------------------------------------------------- the command
def _copy_run(src: Path, dst: Path) -> Path:
    """A run folder without its checkpoints (its config's absolute paths still point at the
    demo's data, features and teacher): the session's demo stays untouched."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_diagnose_on_the_small_demo_stage2_run(demo, tmp_path, capsys):
    out, _ = demo
    run = _copy_run(out / "stage2", tmp_path / "stage2")
    result = diagnose_run(run, pairs=3000)
    written = json.loads((run / OUTPUT).read_text())
    assert written == json.loads(json.dumps(result))
    assert {"run", "stage", "pairs", "rows"} <= set(written)
    assert written["run"] == str(run) and written["stage"] == 2 and written["pairs"] == 3000
    rows = written["rows"]
    assert [(r["features"], r["modality"]) for r in rows] == [
        ("frozen", "image"), ("frozen", "text"), ("adapted", "image"), ("adapted", "text")]
    truth = json.loads((out / "data" / "truth.json").read_text())
    for r in rows:
        assert set(r) == {"features", "modality", "cka_item_embedding", "auc_cointeraction",
                          "probe_accuracy"}
        assert isinstance(r["cka_item_embedding"], float) and 0 <= r["cka_item_embedding"] <= 1
        assert isinstance(r["auc_cointeraction"], float) and 0 <= r["auc_cointeraction"] <= 1
        assert set(r["probe_accuracy"]) == set(truth["attributes"])
        assert all(0 <= v <= 1 for v in r["probe_accuracy"].values())
    assert set(written["auc_item_representations"]) == {"frozen", "adapted"}
    assert all(0 <= v <= 1 for v in written["auc_item_representations"].values())
    # the stage-2 run's features differ from the frozen ones, so the rows do too
    assert rows[0]["cka_item_embedding"] != rows[2]["cka_item_embedding"]
    assert written["sources"]["frozen"]["item_repr"] == str(out / "stage1" / "item_repr.npy")
    # the frozen CKA is what one computes from the files themselves
    feats = np.load(out / "features" / "text.npy").astype(np.float64)
    teacher = np.load(out / "stage1" / "item_repr.npy")
    assert rows[1]["cka_item_embedding"] == pytest.approx(linear_cka(feats, teacher), rel=1e-9)
    # seeded: the same numbers again
    assert diagnose_run(run, pairs=3000)["rows"] == result["rows"]
    text = format_diagnosis(result)
    assert "adapted" in text and "change" in text and "category" in text
    # the CLI: table and --json, exit 0
    assert main(["diagnose", str(run), "--pairs", "500", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs"] == 500 and len(printed["rows"]) == 4


def test_diagnose_stage1_run_has_only_frozen_rows(demo, tmp_path):
    out, _ = demo
    run = _copy_run(out / "stage1", tmp_path / "stage1")
    result = diagnose_run(run, pairs=500)
    assert result["stage"] == 1
    assert [(r["features"], r["modality"]) for r in result["rows"]] == [
        ("frozen", "image"), ("frozen", "text")]
    assert (run / OUTPUT).is_file()


def test_diagnose_bad_input_names_the_path_and_exits_2(demo, tmp_path, capsys):
    out, _ = demo
    with pytest.raises(InputError, match=str(tmp_path / "nothing")):
        diagnose_run(tmp_path / "nothing")
    assert main(["diagnose", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    run = _copy_run(out / "stage2", tmp_path / "stage2")
    shutil.rmtree(run / "features")
    with pytest.raises(InputError, match=f"{run / 'features'}.*adapted"):
        diagnose_run(run)
    assert not (run / OUTPUT).exists()
    # a teacher folder that is gone, then a one-stage run (no teacher: its own representations)
    run = _copy_run(out / "stage2", tmp_path / "stage2b")
    config = (run / "config.yaml").read_text()
    assert f"teacher: {out / 'stage1'}" in config
    (run / "config.yaml").write_text(config.replace(f"teacher: {out / 'stage1'}",
                                                    f"teacher: {tmp_path / 'gone'}"))
    with pytest.raises(InputError, match=str(tmp_path / "gone")):
        diagnose_run(run)
    (run / "config.yaml").write_text(config.replace(f"teacher: {out / 'stage1'}", "teacher: ''"))
    result = diagnose_run(run, pairs=500)
    assert result["sources"]["frozen"]["item_repr"] == str(run / "item_repr.npy")
    assert result["notes"] and len(result["rows"]) == 4

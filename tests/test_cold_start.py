"""Cold start (issue 20): ``data.cold_items`` holds a seeded fraction of the items out of
training entirely; valid/test rank the warm items, the ``cold`` split ranks the held-out items
among themselves by the model's content branch; stage 1 and stage 2 report ``cold`` metrics and
``ptmrec evaluate --split cold`` reproduces them from the run's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset
from run_fixtures import ptmrec

from ptmrec_dist.config import load_config
from ptmrec_dist.config.inputs import DataConfig
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.data.splits import COLD, TRAIN
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.eval.evaluate import Evaluator, evaluate_run
from ptmrec_dist.eval.metrics import evaluate
from ptmrec_dist.train.sampler import BPRSampler
from ptmrec_dist.train.stage1 import run_stage1

QUICK = ["stage1.epochs=6", "stage1.batch_size=64", "stage1.lr=0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("cold") / "tiny")


def cfg_of(data, *overrides):
    return load_config(None, [f"data.path={data}", *overrides])


# ---------------------------------------------------------------------- the split

def test_cold_items_hold_out_every_interaction(data):
    warm = load_interactions(data, DataConfig(split="random"))
    inter = load_interactions(data, DataConfig(split="random", cold_items=0.2, cold_seed=3))
    cold = inter.cold_mask()
    present = np.unique(warm.items)
    assert cold.sum() == round(0.2 * len(present)) and set(np.flatnonzero(cold)) <= set(present)
    # every interaction of a cold item is in the cold split, none elsewhere
    assert (inter.labels[cold[inter.items]] == COLD).all()
    assert not cold[inter.items[inter.labels != COLD]].any()
    assert inter.csr("cold").nnz == int((inter.labels == COLD).sum()) > 0
    assert inter.split_counts()["cold"] == inter.csr("cold").nnz
    assert inter.stats()["cold_items"] == int(cold.sum())
    # users and items keep their indices; same seed, same items; another seed, others
    again = load_interactions(data, DataConfig(split="random", cold_items=0.2, cold_seed=3))
    other = load_interactions(data, DataConfig(split="random", cold_items=0.2, cold_seed=4))
    assert np.array_equal(again.cold_items, inter.cold_items)
    assert not np.array_equal(other.cold_items, inter.cold_items)
    assert inter.n_items == warm.n_items and inter.n_users == warm.n_users


def test_no_cold_items_changes_nothing(data):
    for split in ("random", "x_label"):
        a = load_interactions(data, DataConfig(split=split))
        b = load_interactions(data, DataConfig(split=split, cold_items=0.0, cold_seed=9))
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.items, b.items)
        assert not b.has_cold and "cold" not in b.split_counts()


def test_x_label_split_keeps_labels_of_warm_rows(data):
    plain = load_interactions(data, DataConfig(split="x_label"))
    inter = load_interactions(data, DataConfig(split="x_label", cold_items=0.3))
    cold = inter.cold_mask()
    keep = ~cold[plain.items]
    # rows of users that keep a training row: same order, warm labels as in the file
    got = {(u, i): lab for u, i, lab in zip(inter.users, inter.items, inter.labels)}
    for u, i, lab in zip(plain.users[keep], plain.items[keep], plain.labels[keep]):
        if (u, i) in got:
            assert got[(u, i)] == lab


def test_cold_items_fraction_is_checked(data):
    with pytest.raises(ConfigError, match="cold_items"):
        cfg_of(data, "data.cold_items=0.5")


# ---------------------------------------------------------------------- training never sees them

def test_sampler_never_draws_a_cold_negative(data):
    inter = load_interactions(data, DataConfig(split="random", cold_items=0.25))
    sampler = BPRSampler(inter.csr("train"), 64, seed=0, exclude_items=inter.cold_items)
    cold = inter.cold_mask()
    for epoch in range(3):
        for batch in sampler.epoch(epoch):
            assert not cold[batch["neg"].numpy()].any()
            assert not cold[batch["pos"].numpy()].any()


def test_sampler_without_exclusions_draws_as_before(data):
    inter = load_interactions(data, DataConfig(split="random"))
    train = inter.csr("train")
    a = BPRSampler(train, 64, seed=5)
    b = BPRSampler(train, 64, seed=5, exclude_items=np.zeros(0, np.int64))
    users = np.arange(50) % inter.n_users
    rng = np.random.default_rng(1)
    ref = rng.integers(0, inter.n_items, size=len(users))      # the draws before cold items
    got = a.sample_negatives(users, np.random.default_rng(1))
    keys = set(zip(*train.nonzero()))
    first_ok = np.array([(u, i) not in keys for u, i in zip(users, ref)])
    assert np.array_equal(got[first_ok], ref[first_ok])
    assert np.array_equal(got, b.sample_negatives(users, np.random.default_rng(1)))


# ---------------------------------------------------------------------- the evaluator

def brute_recall(users_r, items_r, target, candidates, mask, k):
    """Mean over users with a positive in ``target`` of hits@k / min(k, positives), ranking only
    ``candidates`` minus ``mask``'s items, by hand."""
    vals = []
    for u in np.flatnonzero(np.diff(target.indptr) > 0):
        pos = set(target.indices[target.indptr[u]:target.indptr[u + 1]])
        seen = set(mask.indices[mask.indptr[u]:mask.indptr[u + 1]])
        cand = [i for i in candidates if i not in seen]
        scores = users_r[u] @ items_r[cand].T
        top = [cand[j] for j in np.argsort(-scores, kind="stable")[:k]]
        vals.append(len(pos & set(top)) / min(k, len(pos)))
    return float(np.mean(vals))


def test_warm_ranking_excludes_cold_items_and_cold_ranks_among_them(data):
    inter = load_interactions(data, DataConfig(split="random", cold_items=0.25))
    cfg = cfg_of(data, "data.split=random", "data.cold_items=0.25", "eval.ks=[5]",
                 "eval.metric=recall@5")
    rng = np.random.default_rng(0)
    users_r = rng.normal(size=(inter.n_users, 8)).astype(np.float32)
    items_r = rng.normal(size=(inter.n_items, 8)).astype(np.float32)
    cold = inter.cold_mask()
    items_r[cold] *= 50         # cold items would take every top place if they were candidates
    reps = (torch.from_numpy(users_r), torch.from_numpy(items_r))
    ev = Evaluator(cfg, inter)
    warm_items = np.flatnonzero(~cold)
    want = brute_recall(users_r, items_r, inter.csr("test"), warm_items, inter.csr("train"), 5)
    assert ev(reps, "test")["recall@5"] == pytest.approx(want, abs=1e-6)
    plain = evaluate(lambda u: reps[0][u] @ reps[1].T, inter.csr("train"), inter.csr("test"), [5])
    assert plain["recall@5"] != pytest.approx(want)        # the exclusion matters here
    want_cold = brute_recall(users_r, items_r, inter.csr("cold"), np.flatnonzero(cold),
                             inter.csr("train"), 5)
    assert ev(reps, "cold")["recall@5"] == pytest.approx(want_cold, abs=1e-6)


# ---------------------------------------------------------------------- stage 1 end to end

@pytest.fixture(scope="module")
def cold_vbpr(data, in_process, tmp_path_factory):
    out = tmp_path_factory.mktemp("cold_vbpr")
    cfg = cfg_of(data, "recommender.name=vbpr", "data.cold_items=0.25", *QUICK)
    return out, run_stage1(cfg, out, log=lambda *_: None)


def test_stage1_reports_cold_metrics_from_the_content_branch(cold_vbpr):
    out, metrics = cold_vbpr
    assert set(metrics["cold"]) == set(metrics["test"]) and 0 <= metrics["cold"]["recall@20"] <= 1
    cfg = load_config(out / "config.yaml")
    inter = load_interactions(cfg.data.path, cfg.data)
    items_r = np.load(out / "item_repr.npy")
    d = cfg.recommender.embedding_dim
    cold = inter.cold_mask()
    # vbpr scores a cold item by its content half alone: the ID half of its row is zero
    assert np.all(items_r[cold, :d] == 0) and np.abs(items_r[cold, d:]).sum() > 0
    assert np.abs(items_r[~cold, :d]).sum() > 0
    # evaluate reproduces the reported cold metrics from the exported files
    again = evaluate_run(out, "cold")
    for key, value in metrics["cold"].items():
        assert again["metrics"][key] == pytest.approx(value, abs=1e-6)


def test_cold_metrics_beat_chance_on_informative_features(cold_vbpr, data):
    """The tiny set's features carry each item's group: the content branch ranks a user's cold
    items above chance among the cold items."""
    out, metrics = cold_vbpr
    inter = load_interactions(data, load_config(out / "config.yaml").data)
    n_cold = len(inter.cold_items)
    cold = inter.csr("cold")
    users = np.flatnonzero(np.diff(cold.indptr) > 0)
    chance = np.mean([min(1.0, 10 / n_cold) if cold[u].nnz else 0 for u in users])
    assert metrics["cold"]["recall@10"] > chance


def test_id_only_model_with_cold_items_is_a_config_error(data, tmp_path):
    res = ptmrec("stage1", "--data", data, "--model", "bpr", "--out", tmp_path / "bpr",
                 "data.cold_items=0.2", "stage1.epochs=1")
    assert res.returncode == 2, res.stderr
    assert "data.cold_items" in res.stderr and "bpr" in res.stderr


def test_evaluate_cold_without_cold_items_says_so(data, in_process, tmp_path):
    cfg = cfg_of(data, "recommender.name=vbpr", "stage1.epochs=1")
    run_stage1(cfg, tmp_path / "warm", log=lambda *_: None)
    res = ptmrec("evaluate", "--run", tmp_path / "warm", "--split", "cold")
    assert res.returncode == 2 and "data.cold_items=0" in res.stderr


# ---------------------------------------------------------------------- stage 2, new items

@pytest.fixture(scope="module")
def cold_demo(demo, in_process, tmp_path_factory):
    """On the small demo with 20 % of the items held out: a stage-1 vbpr run (the teacher) and a
    one-epoch stage-2 run; ``(folder, teacher, stage2, stage-2 metrics)``."""
    from demo_fixtures import stage2_cfg

    from ptmrec_dist.train.stage2 import run_stage2

    demo, _ = demo
    out = tmp_path_factory.mktemp("cold_demo")
    teacher_cfg = load_config(demo / "stage1" / "config.yaml",
                              ["data.cold_items=0.2", "stage1.epochs=2"])
    t_metrics = run_stage1(teacher_cfg, out / "teacher", log=lambda *_: None)
    assert "cold" in t_metrics
    cfg = stage2_cfg(demo, f"stage2.teacher={out / 'teacher'}", "data.cold_items=0.2",
                     "stage2.epochs=1")
    return demo, out / "teacher", out / "s2", run_stage2(cfg, out / "s2", log=lambda *_: None)


def test_stage2_reports_cold_metrics_and_refuses_a_teacher_with_other_cold_items(cold_demo,
                                                                                  tmp_path):
    from demo_fixtures import stage2_cfg

    from ptmrec_dist.train.stage2 import run_stage2

    demo, teacher, s2, m = cold_demo
    assert set(m["cold"]) == set(m["test"])
    again = evaluate_run(s2, "cold")
    for key, value in m["cold"].items():
        assert again["metrics"][key] == pytest.approx(value, abs=1e-6)
    bad = stage2_cfg(demo, f"stage2.teacher={teacher}", "data.cold_items=0.1")
    with pytest.raises(ConfigError, match="cold_items"):
        run_stage2(bad, tmp_path / "bad", log=lambda *_: None)
    # the held-out items never reach training: no cold item has a training interaction
    cfg = load_config(s2 / "config.yaml")
    inter = load_interactions(cfg.data.path, cfg.data)
    assert not inter.cold_mask()[inter.items[inter.labels == TRAIN]].any()


def new_item_catalog(demo, items: np.ndarray, folder):
    """``ptmrec catalog`` of a CSV holding the demo's ``items`` again under new ids
    ``new-<index>`` (their images linked in): what a user's table of new items looks like."""
    import csv

    folder.mkdir(parents=True)
    rows = {int(r["item_id"]): r for r in map(json.loads, (demo / "data" / "items.jsonl")
                                              .read_text().splitlines())}
    (folder / "images").symlink_to(demo / "data" / "images")
    with open(folder / "new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["new_id", "name", "blurb", "picture"])
        for i in items.tolist():
            w.writerow([f"new-{i}", rows[i]["title"], rows[i]["text"], rows[i]["image"]])
    res = ptmrec("catalog", "--items", folder / "new.csv", "--id-column", "new_id", "--title",
                 "{name}", "--text", "{blurb}", "--image-column", "picture", "--out",
                 folder / "catalog")
    assert res.returncode == 0, res.stderr
    return folder / "catalog"


def test_encode_items_scores_new_items_as_the_run_scores_its_cold_items(cold_demo, tmp_path):
    """The run's held-out items, given again as a new catalog under new ids: encode-items gives
    them the representations the run scored them with (stage 1: to float rounding; stage 2:
    to the fp16 rounding of the stored features, the run ranked with its fp32 feature bank),
    and recommend --only-new ranks them by the same scores."""
    from ptmrec_dist.eval.recommend import RunRecommender

    demo, teacher, s2, _ = cold_demo
    cfg = load_config(teacher / "config.yaml")
    cold = load_interactions(cfg.data.path, cfg.data).cold_items
    catalog = new_item_catalog(demo, cold, tmp_path / "new")
    for run, tol in ((teacher, 1e-5), (s2, 2e-2)):
        out = tmp_path / f"enc_{run.name}"
        res = ptmrec("encode-items", "--run", run, "--catalog", catalog, "--out", out)
        assert res.returncode == 0, res.stderr
        assert (out / "item_ids.txt").read_text().split() == [f"new-{i}" for i in cold]
        got, want = np.load(out / "item_repr.npy"), np.load(run / "item_repr.npy")[cold]
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= tol * scale, (run, np.abs(got - want).max(), scale)
        summary = json.loads((out / "encode.json").read_text())
        assert summary["n_items"] == len(cold) and summary["model"] == "vbpr"
        assert summary["encoders"] == ("stage-2 adapter" if run == s2 else "frozen backbone")
    # recommend ranks the new items alone (cold start) or with the run's own
    rec = RunRecommender(teacher, tmp_path / "enc_teacher", only_new=True)
    users = rec.all_users()[:5]
    user_r = np.load(teacher / "user_repr.npy")
    item_r = np.load(teacher / "item_repr.npy")
    for row, u in zip(rec.top(users, k=5), users):
        assert all(i.startswith("new-") for i in row["item_ids"])
        ref = np.sort(user_r[u] @ item_r[cold].T)[::-1][:5]
        assert np.allclose(row["scores"], ref, atol=1e-4)
    mixed = RunRecommender(teacher, tmp_path / "enc_teacher")
    assert mixed.n_items == len(item_r) + len(cold)
    res = ptmrec("recommend", "--run", teacher, "--all-users", "-k", "3", "--new-items",
                 tmp_path / "enc_teacher", "--only-new")
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.returncode == 0 and lines and all(i.startswith("new-") for x in lines
                                                 for i in x["item_ids"])


def test_encode_items_of_a_gated_run_mixes_in_the_frozen_reference(cold_demo, tmp_path):
    """A ``stage2.feature_gate`` run scored its cold items from ``ref + g (adapted - ref)``:
    encode-items rebuilds that from the saved gate (the frozen backbone encodes the new items
    too), so the run's own cold items again get the run's representations; without the saved
    gate it is refused (exit 2) rather than encoded otherwise."""
    from demo_fixtures import stage2_cfg

    from ptmrec_dist.train.stage2 import run_stage2

    demo, teacher, _, _ = cold_demo
    run = tmp_path / "gated"
    run_stage2(stage2_cfg(demo, f"stage2.teacher={teacher}", "data.cold_items=0.2",
                          "stage2.feature_gate=true", "stage2.epochs=1"), run,
               log=lambda *_: None)
    assert (run / "feature_gate.json").is_file()
    cfg = load_config(teacher / "config.yaml")
    cold = load_interactions(cfg.data.path, cfg.data).cold_items
    catalog = new_item_catalog(demo, cold, tmp_path / "new")
    res = ptmrec("encode-items", "--run", run, "--catalog", catalog, "--out", tmp_path / "enc")
    assert res.returncode == 0, res.stderr
    got, want = np.load(tmp_path / "enc" / "item_repr.npy"), np.load(run / "item_repr.npy")[cold]
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert (tmp_path / "enc" / "features" / "reference" / "parts").is_dir()
    (run / "feature_gate.json").unlink()
    res = ptmrec("encode-items", "--run", run, "--catalog", catalog, "--out", tmp_path / "enc2")
    assert res.returncode == 2 and "feature_gate.json" in res.stderr


def test_new_items_with_a_known_id_are_refused(cold_demo, tmp_path):
    demo, teacher, _, _ = cold_demo
    out = tmp_path / "enc"
    catalog = new_item_catalog(demo, np.arange(3), tmp_path / "new")
    assert ptmrec("encode-items", "--run", teacher, "--catalog", catalog,
                  "--out", out).returncode == 0
    (out / "item_ids.txt").write_text("new-0\n7\nnew-2\n")     # "7" is a demo item's id
    res = ptmrec("recommend", "--run", teacher, "--user", "0", "--new-items", out)
    assert res.returncode == 2 and "item_ids.txt:2" in res.stderr and "'7'" in res.stderr
    res = ptmrec("recommend", "--run", teacher, "--user", "0", "--only-new")
    assert res.returncode == 2 and "--new-items" in res.stderr

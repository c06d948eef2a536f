"""Stage 1 end to end on the tiny clustered data: every model trains under DeepSpeed and writes its
outputs, ``evaluate`` agrees with training, early stopping and ``eval_every``, reproducibility,
the CLI (with top-k dumps recomputed here), and a 2-rank torchrun run equal to a 1-rank run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset, signal_during_epoch
from run_fixtures import ptmrec, read_log
from safetensors.torch import load_file

from ptmrec_dist import rec
from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import InputError, TrainingError
from ptmrec_dist.eval.evaluate import evaluate_run
from ptmrec_dist.train.stage1 import build_model, run_stage1

KEYS = {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit") for k in (5, 10, 20, 50)}
QUICK = ["stage1.epochs=15", "stage1.batch_size=64", "stage1.lr=0.01"]
RANDOM_RECALL20 = 20 / 52     # each user: 60 items - 8 training ones masked, 1 held-out positive


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("stage1") / "tiny")


def train(data, out, name, *overrides):
    cfg = load_config(None, [f"data.path={data}", f"recommender.name={name}", *QUICK, *overrides])
    return run_stage1(cfg, out, log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(data, in_process, tmp_path_factory):
    """``trained(name) -> (out, metrics)``: the 15-epoch run of each model, trained once."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"run_{name}")
            cache[name] = (out, train(data, out, name))
        return cache[name]
    return get


def splits(data: Path) -> dict[int, dict[int, set]]:
    """{label: {user: items}} straight from the .inter file (ids are the indices)."""
    rows = np.loadtxt(data, skiprows=1, dtype=np.int64)
    out = {0: {}, 1: {}, 2: {}}
    for u, i, lbl in rows:
        out[int(lbl)].setdefault(int(u), set()).add(int(i))
    return out


@pytest.mark.parametrize("name", rec.names())
def test_every_model_trains_and_writes_its_outputs(name, data, trained):
    out, metrics = trained(name)
    files = ["config.yaml", "log.jsonl", "metrics.json", "user_repr.npy", "item_repr.npy",
             "checkpoints/best/model.safetensors", "checkpoints/best/meta.json"]
    assert all((out / f).is_file() for f in files)
    assert load_config(out / "config.yaml").recommender.name == name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["model"] == name and on_disk["world_size"] == 1
    assert (on_disk["n_users"], on_disk["n_items"]) == (90, 60)
    for split in ("valid", "test"):
        assert set(on_disk[split]) == KEYS
        assert all(0 <= v <= 1 for v in on_disk[split].values())
    meta = json.loads((out / "checkpoints/best/meta.json").read_text())
    assert meta["epoch"] == on_disk["best_epoch"] and meta["valid"] == on_disk["valid"]

    u_r, i_r = np.load(out / "user_repr.npy"), np.load(out / "item_repr.npy")
    assert u_r.shape[0] == 90 and i_r.shape[0] == 60 and u_r.shape[1] == i_r.shape[1]
    # the safetensors weights are the best epoch's: a fresh model loading them exports the same
    model = build_model(load_config(out / "config.yaml"),
                        load_interactions(data, load_config(out / "config.yaml").data))
    model.load_state_dict(load_file(str(out / "checkpoints/best/model.safetensors")))
    with torch.no_grad():
        fresh_u, fresh_i = model.eval().representations()
    np.testing.assert_allclose(fresh_u.detach().numpy(), u_r, atol=1e-6)
    np.testing.assert_allclose(fresh_i.detach().numpy(), i_r, atol=1e-6)

    log = read_log(out)
    ds_files = (out / "checkpoints/best/mp_rank_00_model_states.pt").is_file()
    if name == "pop":
        assert not ds_files and on_disk["epochs_run"] == 1 and len(log) == 1
        counts = np.bincount([i for items in splits(data)[0].values() for i in items],
                             minlength=60)
        np.testing.assert_array_equal((u_r @ i_r.T)[3], counts)
        return
    assert ds_files and (out / "checkpoints/latest").read_text().strip() == "best"
    assert on_disk["epochs_run"] == 15 and not on_disk["stopped_early"]
    assert [r["epoch"] for r in log] == list(range(15))
    best_rec = [r for r in log if r["best"]][-1]
    assert best_rec["epoch"] == on_disk["best_epoch"]
    assert best_rec["valid"]["recall@20"] == pytest.approx(on_disk["valid"]["recall@20"], abs=1e-6)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    if "bpr" in log[0]:     # the ranking term itself (the total includes the regulariser)
        assert log[-1]["bpr"] < 0.6 * log[0]["bpr"], (log[0]["bpr"], log[-1]["bpr"])
    # random ranking: recall@20 = 20/52 = 0.385 (sd 0.05 over 90 users); pop gets 0.62 / 0.46
    assert on_disk["valid"]["recall@20"] > 0.55
    assert on_disk["test"]["recall@20"] > RANDOM_RECALL20 + 0.1


def test_pop_metrics_recomputed_by_hand(data, trained):
    _, metrics = trained("pop")
    s = splits(data)
    counts = np.bincount([i for items in s[0].values() for i in items], minlength=60)
    for label, split in ((1, "valid"), (2, "test")):
        recalls = []
        for u, positives in s[label].items():
            ranked = [i for i in np.lexsort((np.arange(60), -counts)) if i not in s[0][u]]
            recalls.append(len(positives & set(ranked[:20])) / len(positives))
        assert metrics[split]["recall@20"] == pytest.approx(np.mean(recalls), abs=1e-12)


@pytest.mark.parametrize("name", rec.names())
def test_evaluate_run_equals_training_metrics(name, trained):
    out, metrics = trained(name)
    for split in ("test", "valid"):
        result = evaluate_run(out, split)
        assert result["users"] == 90 and result["split"] == split
        assert result["metrics"].keys() == metrics[split].keys()
        for k, v in metrics[split].items():
            assert result["metrics"][k] == pytest.approx(v, abs=1e-9), (split, k)


def test_same_config_same_representations(data, trained, tmp_path):
    out, metrics = trained("bpr")
    again = train(data, tmp_path / "again", "bpr")
    np.testing.assert_array_equal(np.load(tmp_path / "again/user_repr.npy"),
                                  np.load(out / "user_repr.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "again/item_repr.npy"),
                                  np.load(out / "item_repr.npy"))
    assert again["valid"] == metrics["valid"] and again["test"] == metrics["test"]
    # what reproducing it takes is in metrics.json: commit, seeds, threads, versions
    prov = again["provenance"]
    assert prov == metrics["provenance"]
    assert prov["torch_threads"] == torch.get_num_threads() == 1      # in_process sets 1
    assert prov["seeds"] == {"seed": 2026, "data.split_seed": 2026, "data.subsample_seed": None}
    assert torch.__version__.startswith(prov["versions"]["torch"].split("+")[0])
    assert prov["commit"] is None or len(prov["commit"]) == 40


def test_early_stopping(data, in_process, tmp_path):
    # lr 1e-8: the ranking never changes, so valid never improves after epoch 0
    m = train(data, tmp_path / "es", "bpr", "stage1.lr=1e-8", "stage1.patience=2")
    assert m["stopped_early"] is True
    assert m["best_epoch"] == 0 and m["epochs_run"] == 3     # of stage1.epochs=15
    assert m["best_epoch"] < m["epochs_run"] - 1
    log = read_log(tmp_path / "es")
    assert [r["best"] for r in log] == [True, False, False]
    assert json.loads((tmp_path / "es/checkpoints/best/meta.json").read_text())["epoch"] == 0


def test_non_finite_loss_stops_with_a_clear_error(data, in_process, tmp_path):
    # a learning rate of 1e30 overflows the embeddings within an epoch or two
    with pytest.raises(TrainingError, match="stage1.lr"):
        train(data, tmp_path / "nan", "bpr", "stage1.lr=1e30", "stage1.epochs=5")


def test_eval_every(data, in_process, tmp_path):
    m = train(data, tmp_path / "ev", "bpr", "stage1.epochs=8", "stage1.eval_every=3")
    log = read_log(tmp_path / "ev")
    assert [r["epoch"] for r in log] == list(range(8)) and all("loss" in r for r in log)
    assert [r["epoch"] for r in log if "valid" in r] == [0, 3, 6, 7]     # every 3rd + the last
    assert m["best_epoch"] in (0, 3, 6, 7) and m["epochs_run"] == 8


def test_signal_checkpoint_then_resume_is_exact(data, trained, monkeypatch, tmp_path):
    """SIGUSR1 during epoch 6 -> the epoch ends, a checkpoint is written, Interrupted (exit 3);
    --resume finishes the 15 epochs with the uninterrupted run's models and metrics. Another
    configuration is refused, naming the key."""
    from ptmrec_dist.errors import Interrupted
    from ptmrec_dist.train.checkpoint import checkpoint_dirs

    ref_out, ref = trained("vbpr")
    out = tmp_path / "r"
    undo = signal_during_epoch(monkeypatch, 6)
    with pytest.raises(Interrupted, match="SIGUSR1 after epoch 6") as err:
        train(data, out, "vbpr")
    assert err.value.exit_code == 3
    undo()
    saved = [json.loads((p / "state.json").read_text())["epoch"]
             for p in checkpoint_dirs(out / "checkpoints")]
    assert saved == [4, 6]                    # stage1.checkpoint_every=5, then the signal's
    assert [r["epoch"] for r in read_log(out)] == list(range(7))
    assert not (out / "metrics.json").exists()

    cfg = load_config(None, [f"data.path={data}", "recommender.name=vbpr", *QUICK,
                             "stage1.lr=0.02"])
    with pytest.raises(InputError, match="stage1.lr is 0.02 here, 0.01 in the checkpoint"):
        run_stage1(cfg, out, log=lambda *_: None, resume=True)

    cfg = load_config(None, [f"data.path={data}", "recommender.name=vbpr", *QUICK])
    m = run_stage1(cfg, out, log=lambda *_: None, resume=True)
    for key in ("best_epoch", "epochs_run", "valid", "test"):
        assert m[key] == ref[key], key
    for f in ("user_repr.npy", "item_repr.npy"):
        np.testing.assert_array_equal(np.load(out / f), np.load(ref_out / f))
    drop = ("elapsed_s", "epoch_s", "eval_s")
    strip = (lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log])
    assert strip(read_log(out)) == strip(read_log(ref_out))
    # a fresh run in the folder (no --resume) replaces the old run: its checkpoints go
    assert checkpoint_dirs(out / "checkpoints")
    train(data, out, "vbpr", "stage1.epochs=2")
    assert checkpoint_dirs(out / "checkpoints") == []


# ------------------------------------------------------------------------------ subprocesses

def stage1_cli(data, out, name, ds_config, ranks=1):
    proc = ptmrec("stage1", "--out", out, "--data", data, "--model", name,
                  f"stage1.ds_config={ds_config}", "stage1.epochs=3", "stage1.batch_size=64",
                  "stage1.lr=0.01", ranks=ranks)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    """``one_rank(name) -> out``: a 1-rank zero0 CLI run, 3 epochs (run once per model)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(f"cli_{name}")
            stage1_cli(data, cache[name], name, "zero0")
        return cache[name]
    return get


def test_cli_evaluate_dumps_recomputed(data, one_rank, tmp_path):
    run = one_rank("vbpr")
    proc = ptmrec("evaluate", "--run", run, "--dump-topk", tmp_path / "top.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads(proc.stdout)["metrics"]
    test_metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert reported == pytest.approx(test_metrics, abs=1e-9)
    proc = ptmrec("evaluate", "--run", run, "--dump-topk", tmp_path / "top.npy")
    assert proc.returncode == 0 and "recall" in proc.stdout

    rows = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    top = np.load(tmp_path / "top.npy")
    assert top.shape == (90, 51) and top.dtype == np.int64
    np.testing.assert_array_equal(top, [[r["user"], *r["items"]] for r in rows])
    s = splits(data)
    recalls, hits10 = [], []
    for user, *items in top.tolist():
        assert len(set(items)) == 50 and min(items) >= 0       # 52 candidates: no -1 places
        assert not set(items) & s[0][user]                     # training items were masked
        positives = s[2][user]
        recalls.append(len(positives & set(items[:20])) / len(positives))
        hits10.append(bool(positives & set(items[:10])))
    assert sorted(top[:, 0].tolist()) == sorted(s[2])
    assert reported["recall@20"] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert reported["hit@10"] == pytest.approx(np.mean(hits10), abs=1e-12)
    # the dumped ranking is the representations' (ties by lower index)
    scores = np.load(run / "user_repr.npy") @ np.load(run / "item_repr.npy").T
    u = int(top[5, 0])
    order = [i for i in np.lexsort((np.arange(60), -scores[u])) if i not in s[0][u]]
    assert order[:50] == top[5, 1:].tolist()
    # the dump is 50 places long even when the metrics stop at a smaller K
    short = evaluate_run(run, "test", tmp_path / "short.npy",
                         ["eval.ks=[5,10]", "eval.metric=recall@10"])
    assert set(short["metrics"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map",
                                                          "hit") for k in (5, 10)}
    np.testing.assert_array_equal(np.load(tmp_path / "short.npy"), top)


def test_cli_bad_inputs_exit_2(data, one_rank, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(data, bare / "tiny.inter")
    proc = ptmrec("stage1", "--out", tmp_path / "o", "--data", bare / "tiny.inter",
                  "--model", "vbpr")
    assert proc.returncode == 2 and "data.features" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o/metrics.json").exists()
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(one_rank("vbpr") / "config.yaml", half / "config.yaml")
    proc = ptmrec("evaluate", "--run", half)
    assert proc.returncode == 2 and "user_repr.npy" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(InputError, match="config.yaml"):
        evaluate_run(tmp_path / "empty")


# bm3 is `heavy` only to keep this file near 90 s under `make test` (each case ~25 s on 2 cores)
@pytest.mark.parametrize("name,zero", [("vbpr", "zero1"), ("freedom", "zero2"),
                                       pytest.param("bm3", "zero1", marks=pytest.mark.heavy)])
def test_two_ranks_equal_one_rank(name, zero, data, one_rank, tmp_path):
    """torchrun with 2 ranks (ZeRO-1 or -2) vs one rank (zero0): same seed, same global batches,
    so the same model up to float rounding (per-rank partial sums, all-reduce order)."""
    two = stage1_cli(data, tmp_path / "d2", name, zero, ranks=2)
    one = json.loads((one_rank(name) / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["best_epoch"] == one["best_epoch"]
    diffs = {}
    for f in ("user_repr.npy", "item_repr.npy"):
        a, b = np.load(one_rank(name) / f), np.load(tmp_path / "d2" / f)
        assert a.shape == b.shape
        diffs[f] = float(np.abs(a - b).max())
    print(f"{name}: 2-rank vs 1-rank max |diff| {diffs}")
    # vbpr: item_linear.bias gets no BPR gradient (it cancels in pos - neg), only the small L2
    # term plus rounding noise, which Adam normalises: measured 2.7e-5 there, <2e-6 elsewhere
    assert max(diffs.values()) < (1e-4 if name == "vbpr" else 1e-5), diffs
    for split in ("valid", "test"):
        for k, v in one[split].items():
            assert two[split][k] == pytest.approx(v, abs=1e-9), (split, k)


@pytest.mark.parametrize("modalities, expect", [("both", {"image": 16, "text": 12}),
                                                ("text", {"text": 12}), ("image", {"image": 16})])
def test_backbone_modalities_choose_the_features_a_model_reads(data, modalities, expect):
    cfg = load_config(None, [f"data.path={data}", f"backbone.modalities={modalities}"])
    inter = load_interactions(data, cfg.data)
    for name in ("vbpr", "freedom", "bm3"):
        cfg.recommender.name = name
        model = build_model(cfg, inter)
        assert {m: t.shape[1] for m, t in model.item_modal_inputs().items()} == expect, name
    cfg.recommender.name = "vbpr"
    assert build_model(cfg, inter).item_linear.in_features == sum(expect.values())


def test_a_modality_without_features_is_a_clear_error(data, tmp_path):
    shutil.copy(data, tmp_path / "tiny.inter")
    np.save(tmp_path / "text_feat.npy", np.zeros((60, 12), np.float32))
    cfg = load_config(None, [f"data.path={tmp_path / 'tiny.inter'}", "recommender.name=vbpr",
                             "backbone.modalities=image"])
    from ptmrec_dist.errors import ConfigError
    with pytest.raises(ConfigError, match="backbone.modalities=image"):
        build_model(cfg, load_interactions(cfg.data.path, cfg.data))

"""``ptmrec recommend`` (top-k items by raw id from a run's representations) and ``ptmrec extract
--adapter`` (items encoded by a stage-2 run's tuned encoders).

Recommendations are checked on hand-made run folders (a config, interactions with raw string
ids, random representations with a tie) against a by-hand argsort; the adapter extraction on the
small demo's stage-2 runs (prompts, and LoRA trained here) against the features they saved."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from demo_fixtures import stage2_cfg
from ptmrec_dist.cli import main
from ptmrec_dist.clip.extract import run_extract
from ptmrec_dist.config import load_config, save_config
from ptmrec_dist.dist import DistEnv
from ptmrec_dist.errors import InputError
from ptmrec_dist.eval.recommend import RunRecommender, recommend, recommend_all

N_USERS, N_ITEMS, DIM = 6, 25, 4


def _fake_run(folder: Path, data: Path, n_users: int, n_items: int, seed: int = 0) -> Path:
    """A finished-run folder as `evaluate` and `recommend` read it: ``config.yaml`` naming
    ``data`` and random representations; items 3 and 7 (if any) get the same vector (a tie)."""
    rng = np.random.default_rng(seed)
    users_r = rng.normal(size=(n_users, DIM)).astype(np.float32)
    items_r = rng.normal(size=(n_items, DIM)).astype(np.float32)
    if n_items > 7:
        items_r[7] = items_r[3]
    folder.mkdir(parents=True)
    save_config(load_config(None, [f"data.path={data}"]), folder)
    np.save(folder / "user_repr.npy", users_r)
    np.save(folder / "item_repr.npy", items_r)
    return folder


@pytest.fixture
def csv_run(tmp_path, make_catalog):
    """A run on CSV interactions ``user<u>,sku<i>`` (raw string ids, which sort unlike the
    numbers: sku10 < sku2)."""
    catalog = make_catalog(tmp_path, N_ITEMS, interactions="csv", n_users=N_USERS)
    return _fake_run(tmp_path / "run", catalog / "interactions.csv", N_USERS, N_ITEMS)


def _by_hand(run: Path, user: str, k: int, exclude_seen: bool) -> list[str]:
    """The top-k raw item ids of a raw user id, from the raw CSV alone: indices are the sorted
    raw ids, scores ``user_repr @ item_repr.T``, order by (score desc, index asc)."""
    rows = [line.split(",") for line in
            (run.parent / "catalog" / "interactions.csv").read_text().split()]
    users, items = sorted({u for u, _ in rows}), sorted({i for _, i in rows})
    scores = np.load(run / "user_repr.npy")[users.index(user)] @ np.load(run / "item_repr.npy").T
    seen = {items.index(i) for u, i in rows if u == user} if exclude_seen else set()
    order = [int(i) for i in np.lexsort((np.arange(len(items)), -scores)) if i not in seen]
    return [items[i] for i in order[:k]]


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_recommendations_are_the_argsort_of_the_scores_without_seen_items(csv_run,
                                                                          exclude_seen):
    """Every user's list is the by-hand argsort (ties by lower index) with the user's train,
    valid and test items removed; ids go in and come out raw; scores are the ranked ones."""
    users = [f"user{u}" for u in range(N_USERS)]
    got = recommend(csv_run, users, k=10, exclude_seen=exclude_seen)
    assert [r["user_id"] for r in got] == users
    scores = np.load(csv_run / "user_repr.npy") @ np.load(csv_run / "item_repr.npy").T
    items = sorted(f"sku{i}" for i in range(N_ITEMS))
    for r in got:
        assert r["item_ids"] == _by_hand(csv_run, r["user_id"], 10, exclude_seen)
        u = users.index(r["user_id"])
        expect = [scores[u, items.index(i)] for i in r["item_ids"]]
        np.testing.assert_allclose(r["scores"], expect, rtol=1e-6)
        assert r["scores"] == sorted(r["scores"], reverse=True)
    # the tie: items 3 and 7 (sku11 and sku15) have equal scores: the lower index first
    assert (items[3], items[7]) == ("sku11", "sku15")
    for r in recommend(csv_run, users, k=N_ITEMS):
        assert r["item_ids"].index("sku11") + 1 == r["item_ids"].index("sku15")
    # more than the items left: the list is shorter, never padded
    seen = RunRecommender(csv_run).seen()
    left = recommend(csv_run, ["user0"], k=100, exclude_seen=True)[0]["item_ids"]
    assert len(left) == N_ITEMS - seen[users.index("user0")].nnz


def _same_records(a: list[dict], b: list[dict]) -> None:
    """Same users and items in the same order; scores equal to float rounding (a matrix
    product of 1 or 2 rows takes another BLAS kernel than one of many: the last bits differ)."""
    assert [(r["user_id"], r["item_ids"]) for r in a] == [(r["user_id"], r["item_ids"])
                                                          for r in b]
    np.testing.assert_allclose(sum((r["scores"] for r in a), []),
                               sum((r["scores"] for r in b), []), rtol=1e-6, atol=1e-7)


def test_all_users_in_chunks_equals_unchunked_and_per_user(csv_run):
    """``--all-users`` scored 1, 4 or all users at a time gives the same records, and the same
    as asking for each user by id."""
    whole = list(recommend_all(csv_run, k=7, exclude_seen=True, chunk_users=10_000))
    assert len(whole) == N_USERS
    for chunk in (1, 4):
        _same_records(list(recommend_all(csv_run, k=7, exclude_seen=True, chunk_users=chunk)),
                      whole)
    _same_records(recommend(csv_run, [r["user_id"] for r in whole], k=7, exclude_seen=True),
                  whole)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_large_catalogs_are_ranked_in_tiles_with_the_same_records(csv_run, monkeypatch,
                                                                  exclude_seen):
    """Above metrics.BLOCK_ABOVE items recommend ranks tiles of users x items as the evaluator
    does (eval.metrics.chunk_topk_blocked): the same lists, ties included, and their scores."""
    import ptmrec_dist.eval.metrics as metrics
    import ptmrec_dist.eval.recommend as rec

    whole = list(recommend_all(csv_run, k=N_ITEMS, exclude_seen=exclude_seen))
    calls = []
    monkeypatch.setattr(rec, "chunk_topk_blocked",
                        lambda *a, **kw: calls.append(1) or metrics.chunk_topk_blocked(*a, **kw))
    monkeypatch.setattr(metrics, "BLOCK_ABOVE", 3)
    monkeypatch.setattr(metrics, "ITEM_BLOCK", 3)
    monkeypatch.setattr(metrics, "USER_TILE", 2)
    tiled = list(recommend_all(csv_run, k=N_ITEMS, exclude_seen=exclude_seen))
    _same_records(tiled, whole)
    assert calls and any("sku11" in r["item_ids"] for r in tiled)


def test_catalog_mappings_give_the_raw_ids(tmp_path):
    """Where `ptmrec catalog` owns the index, users and items are named by its
    ``user_mapping.tsv`` / ``item_mapping.tsv``; an ``.inter`` file alone names them by
    index, and index gaps are no users for ``--all-users``."""
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "catalog.json").write_text(json.dumps({"items": 5}))
    (cat / "item_mapping.tsv").write_text("".join(f"B0{i}X\t{i}\n" for i in range(5)))
    (cat / "user_mapping.tsv").write_text("alice\t0\nbob\t1\ncarol\t2\n")
    rows = [(0, 0, 0), (0, 1, 0), (0, 2, 2), (1, 2, 0), (1, 3, 1), (2, 4, 0), (2, 0, 0)]
    (cat / "interactions.inter").write_text(
        "userID:token\titemID:token\tx_label:token\n" + "".join(f"{u}\t{i}\t{x}\n"
                                                                for u, i, x in rows))
    run = _fake_run(tmp_path / "run", cat / "interactions.inter", 3, 5)
    [rec] = recommend(run, ["alice"], k=5, exclude_seen=True)
    assert rec["user_id"] == "alice" and set(rec["item_ids"]) == {"B03X", "B04X"}
    with pytest.raises(InputError, match="unknown user id '0'"):
        recommend(run, ["0"])
    # the same indices without a catalog: the ids are the indices; user 1 has no rows
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n2\t3\t0\n")
    run = _fake_run(tmp_path / "run2", plain / "x.inter", 3, 4)
    assert [r["user_id"] for r in recommend_all(run, k=2)] == ["0", "2"]
    assert recommend(run, [2], k=1, exclude_seen=True)[0]["item_ids"][0] in {"0", "1", "2"}


def test_cli_recommend_output_and_bad_input(csv_run, tmp_path, capsys):
    """The command prints or writes the API's records; an unknown user (named with its file
    and line), a bad k, a bad output name or a folder that is not a run is exit 2."""
    assert main(["recommend", "--run", str(csv_run), "--user", "user2", "--user", "user0",
                 "-k", "3", "--exclude-seen"]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    _same_records(printed, recommend(csv_run, ["user2", "user0"], k=3, exclude_seen=True))
    out = tmp_path / "recs" / "all.jsonl"
    assert main(["recommend", "--run", str(csv_run), "--all-users", "--out", str(out)]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    _same_records(written, list(recommend_all(csv_run, k=20)))
    users = tmp_path / "users.txt"
    users.write_text("user1\n\n  user3 \nnobody\nuser4\n")
    assert main(["recommend", "--run", str(csv_run), "--users", str(users)]) == 2
    err = capsys.readouterr().err
    assert f"{users}:4:" in err and "unknown user id 'nobody'" in err
    users.write_text("user1\n  user3 \n")
    assert main(["recommend", "--run", str(csv_run), "--users", str(users), "-k", "2"]) == 0
    assert [json.loads(x)["user_id"] for x in capsys.readouterr().out.split("\n") if x] == \
        ["user1", "user3"]
    for args, needle in ((["--user", "user9"], "--user: unknown user id 'user9'"),
                         (["--user", "user1", "-k", "0"], "k must be >= 1"),
                         (["--all-users", "--out", str(tmp_path / "x.csv")], ".jsonl"),
                         (["--all-users", "--run", str(tmp_path)], "not a run folder")):
        run = [] if "--run" in args else ["--run", str(csv_run)]
        assert main(["recommend", *run, *args]) == 2, args
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# --------------------------------------------------------------------------- extract --adapter

def _assert_same_features(extracted: Path, run: Path) -> None:
    """The extracted features equal the ones the stage-2 run saved, bit for bit (both in the
    run's extract.feature_dtype)."""
    for m in ("image", "text"):
        a, b = np.load(extracted / f"{m}.npy"), np.load(run / "features" / f"{m}.npy")
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), (m, np.abs(a.astype(np.float64) - b).max())
    assert np.array_equal(np.load(extracted / "present.npy"),
                          np.load(run / "features" / "present.npy"))


def test_extract_with_a_prompt_adapter_gives_the_runs_features(demo, tmp_path, capsys):
    """`extract --adapter` on the demo's stage-2 (prompt) run reproduces the features it saved
    at its best epoch bit for bit, records the adapter, and differs from the frozen features;
    another backbone, or a backbone whose weights changed since the run, is exit 2; and
    `recommend` reads the same run (``.inter`` ids: indices)."""
    out, _ = demo
    run = out / "stage2"
    feats = tmp_path / "feats"
    assert main(["extract", "--adapter", str(run), "--out", str(feats),     # the run's shards
                 "extract.num_workers=0"]) == 0
    _assert_same_features(feats, run)
    meta = json.loads((feats / "meta.json").read_text())
    assert meta["adapter"]["method"] == "prompt" and meta["adapter"]["run"] == str(run)
    assert load_config(feats / "config.yaml").stage2.prompt_len == 2
    frozen = np.load(out / "features" / "image.npy")
    assert not np.array_equal(np.load(feats / "image.npy"), frozen)

    other = tmp_path / "other-clip"
    assert main(["extract", "--adapter", str(run), "--shards", str(out / "shards"),
                 "--backbone", str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    name = load_config(run / "config.yaml").backbone.name_or_path
    assert str(other) in err and name in err
    same = Path(name) / ".." / Path(name).name           # the same folder, spelled otherwise
    assert main(["extract", "--adapter", str(run), "--backbone", str(same),
                 "--out", str(tmp_path / "same"), "extract.num_workers=0"]) == 0
    _assert_same_features(tmp_path / "same", run)
    # a copy of the run whose checkpoint recorded other pretrained weights
    copy = tmp_path / "copy"
    (copy / "checkpoints" / "step-00000001").mkdir(parents=True)
    for name in ("config.yaml", "adapter.safetensors"):
        shutil.copy(run / name, copy / name)
    (copy / "checkpoints" / "step-00000001" / "state.json").write_text(
        json.dumps({"backbone_sha256": "0" * 64}))
    with pytest.raises(InputError, match="not the ones the run"):
        run_extract(load_config(None, ["extract.num_workers=0"]), out / "shards",
                    tmp_path / "y", DistEnv(), log=lambda _m: None, adapter=copy)
    with pytest.raises(InputError, match="not a finished `ptmrec stage2` run"):
        run_extract(load_config(None), out / "shards", tmp_path / "z", DistEnv(),
                    adapter=out / "stage1")

    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--user", "3", "-k", "5",
                 "--exclude-seen"]) == 0
    [rec] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rec["user_id"] == "3" and len(rec["item_ids"]) == 5
    assert all(0 <= int(i) < 120 for i in rec["item_ids"])


def test_extract_with_a_lora_adapter_gives_the_runs_features(demo, tmp_path):
    """A LoRA stage-2 run (one epoch, trained here): the Python API with ``adapter=`` gives
    the features the run saved, bit for bit."""
    from ptmrec_dist.train.stage2 import run_stage2

    out, _ = demo
    run = tmp_path / "lora"
    m = run_stage2(stage2_cfg(out, "peft.method=lora", "stage2.epochs=1", "stage2.lr=0.003"),
                   run, log=lambda *_: None)       # LoRA's documented rate (see test_export)
    assert m["method"] == "lora"
    meta = run_extract(load_config(run / "config.yaml"), out / "shards", tmp_path / "feats",
                       DistEnv(), log=lambda _m: None, adapter=run)
    assert meta["adapter"]["method"] == "lora"
    _assert_same_features(tmp_path / "feats", run)
    # the adapter moved the features (the best epoch is a trained one, LoRA's B is not 0)
    assert m["best_epoch"] >= 0
    assert not np.array_equal(np.load(tmp_path / "feats" / "text.npy"),
                              np.load(out / "features" / "text.npy"))


def test_extract_rebuilds_a_gated_runs_features(demo, tmp_path):
    """A ``stage2.feature_gate`` run ranked with ``ref + g (adapted - ref)`` and saved its best
    epoch's exact g (``feature_gate.json``): the extraction encodes with the frozen backbone too
    (``OUT/reference``) and gives the run's features bit for bit. A run without the file (made
    before it was saved) gets the adapted encoders' own features, with a note in meta.json."""
    from ptmrec_dist.train.stage2 import run_stage2

    out, _ = demo
    run = tmp_path / "gated"
    m = run_stage2(stage2_cfg(out, "stage2.feature_gate=true", "stage2.epochs=2"), run,
                   log=lambda *_: None)
    gate = json.loads((run / "feature_gate.json").read_text())
    assert sorted(gate) == ["image", "text"]
    assert m["best_epoch"] >= 0 and any(g != 0 for g in gate.values())   # a trained gate
    notes = []
    meta = run_extract(load_config(run / "config.yaml"), out / "shards", tmp_path / "feats",
                       DistEnv(), log=notes.append, adapter=run)
    assert meta["adapter"]["feature_gate"] == gate
    assert sorted(p.name for p in (tmp_path / "feats" / "reference" / "parts").iterdir()) == \
        sorted(p.name for p in (tmp_path / "feats" / "parts").iterdir())
    _assert_same_features(tmp_path / "feats", run)
    # the gate mixed in the frozen reference: not the adapted encoders' own features
    own = tmp_path / "own"
    shutil.copytree(run, own)
    (own / "feature_gate.json").unlink()
    notes = []
    meta = run_extract(load_config(own / "config.yaml"), out / "shards", tmp_path / "feats2",
                       DistEnv(), log=notes.append, adapter=own)
    assert meta["adapter"]["feature_gate"] == "not applied"
    assert any("feature_gate" in n for n in notes)
    assert not (tmp_path / "feats2" / "reference").exists()
    moved = [not np.array_equal(np.load(tmp_path / "feats2" / f"{m}.npy"),
                                np.load(run / "features" / f"{m}.npy"))
             for m, g in gate.items() if g != 1]
    assert moved and all(moved)


def test_extract_with_a_bf16_runs_adapter_encodes_in_bf16(demo, tmp_path):
    """A run trained with stage2.precision=bf16 (DeepSpeed cast the backbone) evaluated with
    bf16 features: the extraction casts the backbone too and gives them bit for bit."""
    from ptmrec_dist.train.stage2 import run_stage2

    out, _ = demo
    run = tmp_path / "bf16"
    m = run_stage2(stage2_cfg(out, "stage2.precision=bf16", "stage2.epochs=1"), run,
                   log=lambda *_: None)
    assert m["bf16"]
    meta = run_extract(load_config(run / "config.yaml"), out / "shards", tmp_path / "feats",
                       DistEnv(), log=lambda _m: None, adapter=run)
    assert meta["adapter"]["bf16"] and meta["backbone_dtype"] == "bf16"
    _assert_same_features(tmp_path / "feats", run)

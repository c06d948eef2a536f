"""The synthetic benchmark generator: layout, determinism, interaction rules, the domain gap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptmrec_dist.config import SyntheticConfig
from ptmrec_dist.data import synthetic
from ptmrec_dist.data.splits import random_split_labels
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.io import sha256_file

CFG = dict(n_items=60, n_users=40, seed=3, image_size=32)
PATTERN_WORDS = ("solid", "stripe", "stripes", "striped", "dot", "dots", "dotted", "polka",
                 "check", "checks", "checked", "checkered", "plaid", "zigzag", "zig-zag", "grid",
                 "plain", "pattern", "patterned")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z\-]*", text.lower()))


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text.lower()) is not None


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_inter(path: Path) -> np.ndarray:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "userID\titemID\tx_label"
    return np.array([[int(v) for v in line.split("\t")] for line in lines[1:]], dtype=np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "a"
    summary = synthetic.generate(SyntheticConfig(**CFG), out, split_seed=7)
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    return out, summary, truth


def test_layout_and_formats(data):
    out, summary, truth = data
    n_items, n_users = CFG["n_items"], CFG["n_users"]
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == n_items
    for i, rec in enumerate(items):
        assert set(rec) == {"item_id", "title", "text", "image"}
        assert rec["item_id"] == i and isinstance(rec["item_id"], int)
        assert rec["image"] == f"images/{i:09d}.jpg"
        assert rec["title"] and rec["text"]
        with Image.open(out / rec["image"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    assert len(list((out / "images").iterdir())) == n_items
    caps = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [c["item_id"] for c in caps] == list(range(n_items))
    assert all(set(c) == {"item_id", "caption"} and c["caption"] for c in caps)
    rows = _read_inter(out / "interactions.inter")
    assert summary["n_items"] == n_items and summary["n_users"] == n_users
    assert summary["n_interactions"] == len(rows) == truth["counts"]["interactions"]
    assert summary["out_dir"] == str(out) and summary["seconds"] >= 0
    assert sum(summary["splits"].values()) == len(rows)
    assert summary["splits"] == {k: int(np.sum(rows[:, 2] == j))
                                 for j, k in enumerate(("train", "valid", "test"))}


def test_truth_contents(data):
    _, _, truth = data
    assert truth["seed"] == CFG["seed"] and truth["split_seed"] == 7
    assert truth["visibility"]["pattern"] == ["image"]
    assert truth["visibility"]["material"] == ["text"]
    assert truth["caption_attributes"] == ["category", "colour"]
    for a in truth["attributes"]:
        n_values = len(truth["vocab"][a])
        vals = truth["item_attributes"][a]
        assert len(vals) == CFG["n_items"] and all(0 <= v < n_values for v in vals)
        pref = np.array(truth["user_preferences"][a])
        assert pref.shape == (CFG["n_users"], n_values)
    assert len(truth["popularity"]) == CFG["n_items"] and min(truth["popularity"]) > 0
    assert len(truth["colour_rgb"]) == len(truth["vocab"]["colour"])
    assert truth["importance"]["pattern"] > truth["importance"]["colour"]


def test_deterministic_and_seeded(data, tmp_path):
    out, _, _ = data
    again = tmp_path / "b"
    synthetic.generate(SyntheticConfig(**CFG), again, split_seed=7)
    assert _hashes(again) == _hashes(out)
    other = tmp_path / "c"
    synthetic.generate(SyntheticConfig(**{**CFG, "seed": 4}), other, split_seed=7)
    h_out, h_other = _hashes(out), _hashes(other)
    for name in ("items.jsonl", "captions.jsonl", "interactions.inter", "images/000000000.jpg"):
        assert h_out[name] != h_other[name], name


def test_output_does_not_depend_on_worker_count(data, tmp_path, monkeypatch):
    out, _, _ = data
    monkeypatch.setattr(synthetic, "POOL_MIN_ITEMS", 0)   # use the pool even for 60 items
    monkeypatch.setattr(synthetic, "IMAGE_CHUNK", 7)
    par = tmp_path / "par"
    synthetic.generate(SyntheticConfig(**CFG), par, split_seed=7, workers=2)
    assert _hashes(par) == _hashes(out)


def test_interactions_follow_the_rules(data):
    out, _, _ = data
    rows = _read_inter(out / "interactions.inter")
    users, items, labels = rows.T
    assert users.min() == 0 and users.max() == CFG["n_users"] - 1
    assert items.min() >= 0 and items.max() < CFG["n_items"]
    counts = np.bincount(users, minlength=CFG["n_users"])
    assert counts.min() >= SyntheticConfig().min_interactions
    assert counts.max() <= CFG["n_items"] // 2
    assert len(np.unique(users * CFG["n_items"] + items)) == len(rows)   # no duplicate pairs
    assert np.array_equal(labels, random_split_labels(users, 7))
    for u, n in enumerate(counts):
        lab = labels[users == u]
        k = max(1, n // 10)
        assert (lab == 1).sum() == k and (lab == 2).sum() == k and (lab == 0).sum() == n - 2 * k
    assert 0.6 * 12 < counts.mean() < 1.5 * 12                            # mean_interactions


def test_captions_name_only_category_and_colour(data):
    out, _, truth = data
    caps = [json.loads(line)["caption"]
            for line in (out / "captions.jsonl").read_text().splitlines()]
    banned = set(PATTERN_WORDS) | set(truth["vocab"]["shape"]) | set(truth["vocab"]["pattern"])
    for syns in truth["synonyms"]["material"]:
        banned |= _words(" ".join(syns)) - {"soft", "organic", "natural", "recycled"}
    va, vocab = truth["item_attributes"], truth["vocab"]
    for i, cap in enumerate(caps):
        assert not (_words(cap) & banned), cap
        assert _mentions(cap, vocab["category"][va["category"][i]])
        assert _mentions(cap, vocab["colour"][va["colour"][i]])


def test_texts_never_name_the_pattern_but_name_the_rest(data):
    out, _, truth = data
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    va, syn = truth["item_attributes"], truth["synonyms"]
    banned = set(PATTERN_WORDS) | set(truth["vocab"]["pattern"])
    for i, rec in enumerate(items):
        full = rec["title"] + " " + rec["text"]
        assert not (_words(full) & banned), full
        for a in ("material", "category", "colour", "shape"):
            assert any(_mentions(rec["text"], s) for s in syn[a][va[a][i]]), (a, rec["text"])


def test_domain_gap_is_real(data):
    out, _, truth = data
    share = truth["utility_variance_share"]
    visible = share["category"] + share["colour"]
    assert visible < 0.15 and visible < 0.5 * (share["pattern"] + share["material"])
    rows = _read_inter(out / "interactions.inter")
    users, items = rows[:, 0], rows[:, 1]
    for a in ("pattern", "material"):
        pref = np.array(truth["user_preferences"][a])
        best = pref.argmax(axis=1)
        values = np.array(truth["item_attributes"][a])
        hit = values[items] == best[users]
        per_user = np.bincount(users, hit.astype(float)) / np.bincount(users)
        # what uniform choice would give: the share of catalog items with the user's best value
        base = np.bincount(values, minlength=pref.shape[1])[best] / len(values)
        assert per_user.mean() > 1.5 / pref.shape[1], (a, per_user.mean())
        assert per_user.mean() > 1.5 * base.mean(), (a, per_user.mean(), base.mean())


def test_images_show_the_item_colour(data):
    out, _, truth = data
    palette = np.array(truth["colour_rgb"], dtype=np.float64)
    colours = truth["item_attributes"]["colour"]
    ranks = []
    for i, c in enumerate(colours):
        a = np.asarray(Image.open(out / f"images/{i:09d}.jpg"), dtype=np.float64)
        n = a.shape[0]
        centre = a[n // 2 - n // 8: n // 2 + n // 8, n // 2 - n // 8: n // 2 + n // 8]
        d = ((palette - centre.reshape(-1, 3).mean(axis=0)) ** 2).sum(axis=1)
        ranks.append(int((d < d[c]).sum()))                 # 0: its own colour is the nearest
    ranks = np.array(ranks)
    assert np.mean(ranks <= 2) >= 0.9 and np.mean(ranks == 0) >= 0.5, np.bincount(ranks)


def test_invalid_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="synthetic.min_interactions"):
        synthetic.generate(SyntheticConfig(n_items=10, n_users=5, min_interactions=6,
                                           mean_interactions=8), tmp_path / "x")
    with pytest.raises(ConfigError, match="synthetic.n_items"):
        synthetic.generate(SyntheticConfig(n_items=5, n_users=5), tmp_path / "y")


def test_stale_images_of_a_larger_run_are_removed(tmp_path):
    out = tmp_path / "d"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000000099.jpg").write_bytes(b"old")
    (out / "images" / "notes.txt").write_text("keep")
    synthetic.generate(SyntheticConfig(n_items=20, n_users=5, image_size=16), out)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:09d}.jpg" for i in range(20)] + ["notes.txt"]


def test_catalog_owns_the_item_index_when_few_users(tmp_path):
    """Ten users cannot touch 400 items: the last items have no interaction, yet the catalog
    (catalog.json) keeps every item in the index, so every item is sharded and has a row."""
    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.data.shards import write_shards

    cfg = SyntheticConfig(n_items=400, n_users=10, seed=0, image_size=16)
    synthetic.generate(cfg, tmp_path / "d", workers=1)
    rows = _read_inter(tmp_path / "d" / "interactions.inter")
    assert rows[:, 1].max() < 399                          # the last item has no interaction
    assert json.loads((tmp_path / "d" / "catalog.json").read_text())["items"] == 400
    inter = load_interactions(tmp_path / "d" / "interactions.inter", warn=lambda m: None)
    assert inter.n_items == 400
    manifest = write_shards(tmp_path / "d", tmp_path / "s", shard_size=100, log=lambda m: None)
    assert manifest["n_items"] == manifest["n_written"] == 400

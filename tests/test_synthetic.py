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


# --------------------------------------------------------------------------- the 1M-item path
def _same_taste(cfg: SyntheticConfig, k: int):
    """Every user with user 0's preferences and K interactions: one choice model for all."""
    prefs, _ = synthetic.sample_users(cfg)
    prefs = {a: np.repeat(p[:1], cfg.n_users, axis=0) for a, p in prefs.items()}
    return prefs, np.full(cfg.n_users, k, np.int64)


def _inclusion_of_two(cfg: SyntheticConfig, prefs, item_attrs, pop) -> np.ndarray:
    """P(item among the 2 drawn without replacement from softmax(utility / T)), exactly."""
    u = synthetic.utility(prefs, item_attrs, np.log(pop), cfg.popularity_weight,
                          np.array([0]))[0] / cfg.temperature
    p = np.exp(u - u.max())
    p /= p.sum()
    return p + p * ((p / (1 - p)).sum() - p / (1 - p))


@pytest.mark.parametrize("types", [None, 3])
@pytest.mark.parametrize("sampler", ["exact", "grouped"])
def test_both_samplers_draw_from_the_choice_model(sampler, types):
    """Inclusion frequencies against the exact probabilities: with the generator's items (about
    one item per attribute type) and with 30 items of only 3 types (the grouped sampler then
    picks within a type by popularity)."""
    cfg = SyntheticConfig(n_items=30, n_users=20000, seed=3, temperature=0.7, sampler=sampler)
    item_attrs, pop = synthetic.sample_items(cfg)
    if types:
        item_attrs = {a: v[np.arange(cfg.n_items) % types] for a, v in item_attrs.items()}
    prefs, k = _same_taste(cfg, 2)
    draw = synthetic.sample_interactions if sampler == "exact" else \
        synthetic.sample_interactions_grouped
    users, items = draw(cfg, prefs, k, item_attrs, pop)
    assert np.array_equal(np.bincount(users, minlength=cfg.n_users), k)
    freq = np.bincount(items, minlength=cfg.n_items) / cfg.n_users
    want = _inclusion_of_two(cfg, prefs, item_attrs, pop)
    se = np.sqrt(want * (1 - want) / cfg.n_users)
    z = np.abs(freq - want) / se
    assert z.max() < 5, (sampler, z.max(), int(z.argmax()))


def test_grouped_sampler_takes_k_distinct_items_even_when_k_is_half_the_catalog():
    cfg = SyntheticConfig(n_items=24, n_users=700, seed=1, popularity_weight=3.0,
                          min_interactions=12, mean_interactions=12, sampler="grouped")
    item_attrs, pop = synthetic.sample_items(cfg)
    prefs, k = synthetic.sample_users(cfg)
    assert (k == 12).all()
    users, items = synthetic.sample_interactions_grouped(cfg, prefs, k, item_attrs, pop)
    assert np.array_equal(np.bincount(users, minlength=cfg.n_users), k)
    assert len(np.unique(users * cfg.n_items + items)) == len(users)      # no repeats
    assert items.min() >= 0 and items.max() < cfg.n_items


def test_sampler_auto_is_exact_up_to_100k_items(tmp_path):
    assert synthetic.sampler_kind(SyntheticConfig(n_items=100_000)) == "exact"
    assert synthetic.sampler_kind(SyntheticConfig(n_items=100_001)) == "grouped"
    assert synthetic.sampler_kind(SyntheticConfig(n_items=50, sampler="grouped")) == "grouped"
    with pytest.raises(ConfigError, match="synthetic.sampler"):
        synthetic.generate(SyntheticConfig(n_items=50, n_users=5, sampler="fast"), tmp_path)
    out = synthetic.generate(SyntheticConfig(n_items=60, n_users=40, sampler="grouped"),
                             tmp_path / "g")
    truth = json.loads((tmp_path / "g" / "truth.json").read_text())
    assert out["sampler"] == truth["sampler"] == "grouped"
    inter = _read_inter(tmp_path / "g" / "interactions.inter")
    assert len(inter) == out["n_interactions"] == sum(truth["user_interaction_target"])


def test_shards_straight_from_the_generator_equal_make_data_then_shard(tmp_path):
    from ptmrec_dist.data.shards import verify_shards, write_shards

    cfg = SyntheticConfig(n_items=450, n_users=120, seed=0)
    synthetic.generate(cfg, tmp_path / "files")
    ref = write_shards(tmp_path / "files", tmp_path / "two_step", shard_size=200,
                       log=lambda m: None)
    (tmp_path / "direct" / "shards").mkdir(parents=True)
    (tmp_path / "direct" / "shards" / "items-000009.tar").write_bytes(b"stale")
    out = synthetic.generate(cfg, tmp_path / "direct", shards=tmp_path / "direct" / "shards",
                             shard_size=200, workers=2)
    assert out["shards"] == str(tmp_path / "direct" / "shards")
    assert not (tmp_path / "direct" / "images").exists()        # no image files at all
    man = json.loads((tmp_path / "direct" / "shards" / "manifest.json").read_text())
    assert [e["sha256"] for e in man["shards"]] == [e["sha256"] for e in ref["shards"]]
    assert man["shards"] == ref["shards"] and man["n_items"] == ref["n_items"] == 450
    assert sorted(p.name for p in (tmp_path / "direct" / "shards").glob("*.tar")) == \
        [e["name"] for e in ref["shards"]]                       # the stale shard is gone
    good, bad = verify_shards(tmp_path / "direct" / "shards")
    assert len(good) == 3 and not bad.total
    for name in ("interactions.inter", "captions.jsonl", "truth.json", "catalog.json"):
        assert (tmp_path / "direct" / name).read_bytes() == \
            (tmp_path / "files" / name).read_bytes(), name
    a = [json.loads(x) for x in (tmp_path / "files" / "items.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "direct" / "items.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "image"} for x in a] == b


def test_cli_make_data_straight_to_shards(tmp_path):
    from run_fixtures import ptmrec

    proc = ptmrec("make-data", "synthetic", "--out", tmp_path / "d", "--items", "120",
                  "--users", "30", "--shards", tmp_path / "s", "--shard-size", "50",
                  "--workers", "1", "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["shards"] == str(tmp_path / "s") and summary["sampler"] == "exact"
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [e["n_items"] for e in man["shards"]] == [50, 50, 20]
    proc = ptmrec("verify", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = ptmrec("make-data", "synthetic", "--out", tmp_path / "e", "--items", "120",
                  "--shards", tmp_path / "t", "--shard-size", "0")
    assert proc.returncode == 2 and "shard size" in proc.stderr


def test_caption_mentions_name_the_true_hidden_values_at_the_set_rate(tmp_path):
    """synthetic.caption_mention_prob: a caption also names pattern, shape and material, each
    with that probability and always with the item's true value; 0 leaves every file as it was."""
    cfg = dict(CFG, n_items=300)
    synthetic.generate(SyntheticConfig(**cfg), tmp_path / "zero")
    synthetic.generate(SyntheticConfig(**cfg, caption_mention_prob=0.0), tmp_path / "zero2")
    assert _hashes(tmp_path / "zero") == _hashes(tmp_path / "zero2")
    synthetic.generate(SyntheticConfig(**cfg, caption_mention_prob=0.3), tmp_path / "some")
    truth = json.loads((tmp_path / "some" / "truth.json").read_text())
    assert truth["caption_mention_prob"] == 0.3 and "caption_mention_prob" not in json.loads(
        (tmp_path / "zero" / "truth.json").read_text())
    for name in ("interactions.inter", "items.jsonl"):       # only the captions differ
        assert (tmp_path / "some" / name).read_bytes() == (tmp_path / "zero" / name).read_bytes()
    caps = [json.loads(x)["caption"]
            for x in (tmp_path / "some" / "captions.jsonl").read_text().splitlines()]
    va, vocab = truth["item_attributes"], truth["vocab"]
    said = {"pattern": 0, "shape": 0, "material": 0}
    for i, cap in enumerate(caps):
        assert _mentions(cap, vocab["category"][va["category"][i]])
        assert _mentions(cap, vocab["colour"][va["colour"][i]])
        pattern = synthetic.PATTERN_WORDS[va["pattern"][i]]
        shape, material = vocab["shape"][va["shape"][i]], vocab["material"][va["material"][i]]
        for a, word in (("pattern", pattern), ("shape", f"{shape}-shaped"),
                        ("material", f"made of {material}")):
            said[a] += _mentions(cap, word)
        # never a wrong value: no other pattern word, shape or material appears
        others = (set(synthetic.PATTERN_WORDS) - {pattern}) | (set(vocab["shape"]) - {shape}) \
            | (set(vocab["material"]) - {material})
        assert not any(_mentions(cap, w) for w in others), cap
        assert cap.split()[-1] != "of" and "  " not in cap
    for a, n in said.items():       # 300 items at p = 0.3: 90 expected, sd 7.9
        assert 60 <= n <= 120, (a, n)
    one = synthetic.generate(SyntheticConfig(**cfg, caption_mention_prob=1.0), tmp_path / "all")
    assert one["n_items"] == 300
    cap0 = json.loads((tmp_path / "all" / "captions.jsonl").read_text().splitlines()[0])
    assert "-shaped" in cap0["caption"] and " made of " in cap0["caption"]
    with pytest.raises(ConfigError, match="synthetic.caption_mention_prob"):
        synthetic.generate(SyntheticConfig(**cfg, caption_mention_prob=1.5), tmp_path / "bad")

"""``ptmrec catalog``: a user's item table + interactions -> items.jsonl, images, interactions
with one item index, every drop counted (data/ingest.py, data/build_catalog.py)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from ptmrec_dist.cli import main
from ptmrec_dist.data.build_catalog import CatalogSpec, build_catalog, k_core
from ptmrec_dist.data.catalog import read_catalog
from ptmrec_dist.data.ingest import Template, read_rows
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.data.splits import TEST, TRAIN, VALID, temporal_split_labels
from ptmrec_dist.data.shards import write_shards
from ptmrec_dist.errors import InputError


def _image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 36), colour).save(path)


@pytest.fixture
def movies(tmp_path):
    """6 movies (m1..m6; m4 twice, m5 without poster, m6 without any text), 6 users."""
    d = tmp_path / "raw"
    d.mkdir()
    (d / "items.csv").write_text(
        'movie_id,title,overview\n'
        'm1,Toy Story,"Toys, alive; a cowboy."\n'
        'm2,GoldenEye,\n'
        'm3,,"A heist, told backwards."\n'
        'm4,Heat,A duel.\n'
        'm4,Heat (again),ignored\n'
        'm5,No Poster,Seen nowhere.\n'
        'm6,,\n')
    for i in (1, 2, 3, 4, 6):
        _image(d / "posters" / f"m{i}.jpg", (40 * i, 20, 20))
    rows = ["user_id,movie_id,rating,unix_timestamp"]
    for u in range(6):
        for i, m in enumerate(("m1", "m2", "m3", "m4")):
            rows.append(f"u{u},{m},{1 + (u + i) % 5},{1000 + 10 * u + i}")
    rows += ["u0,m1,5,2000", "u1,m5,4,1", "u2,m9,4,1"]   # a duplicate, a dropped and an unknown item
    (d / "ratings.csv").write_text("\n".join(rows) + "\n")
    return d


def test_template_drops_missing_fields_with_their_separator():
    t = Template("{title}. {overview}")
    assert t.render({"title": "Heat", "overview": "A duel."}) == "Heat. A duel."
    assert t.render({"title": "Heat", "overview": ""}) == "Heat"
    assert t.render({"title": None, "overview": "A duel."}) == "A duel."
    assert t.render({"title": "nan"}) == ""
    assert Template("{title} ({year})").render({"title": "Heat", "year": "1995"}) == "Heat (1995)"
    assert Template("{description}").render({"description": ["Soft.", "Red."]}) == "Soft. Red."
    with pytest.raises(InputError, match="must name a column"):
        Template("{}. {title}")


def test_movielens_shaped_catalog_end_to_end(movies, tmp_path):
    out = tmp_path / "cat"
    summary = build_catalog(CatalogSpec(items=movies / "items.csv", out=out, title="title",
                                        text="{overview}", image="posters/{movie_id}.jpg",
                                        interactions=movies / "ratings.csv"), log=lambda m: None)
    dropped = {rule: d["count"] for rule, d in summary["dropped"].items()}
    assert dropped == {"duplicate item rows (first kept)": 1,
                       "items without an image": 1,          # m5
                       "items without a text": 1,            # m6 (m3 keeps its overview)
                       "duplicate interactions (first kept)": 1,
                       "interactions with an item not in the table (or dropped from it)": 2}
    assert summary["dropped"]["items without an image"]["first"] == ["m5"]
    assert (summary["items"], summary["users"], summary["interactions"]) == (4, 6, 24)
    assert summary == json.loads((out / "catalog.json").read_text())

    items = read_catalog(out)
    assert [it.item_id for it in items] == ["0", "1", "2", "3"]            # the table's order
    raw = [json.loads(line)["raw_id"] for line in (out / "items.jsonl").read_text().splitlines()]
    assert raw == ["m1", "m2", "m3", "m4"]
    assert items[0].encoder_text == "Toy Story. Toys, alive; a cowboy."
    assert items[1].encoder_text == "GoldenEye" and items[2].encoder_text == "A heist, told backwards."
    assert items[3].title == "Heat"                                        # the first m4 row
    with Image.open(out / items[1].image) as im:                           # m2's own poster
        assert im.getpixel((0, 0)) == (80, 20, 20)

    inter = load_interactions(out)
    assert (inter.n_users, inter.n_items) == (6, 4)
    assert inter.csr("train").nnz + inter.csr("valid").nnz + inter.csr("test").nnz == 24
    mapping = dict(line.split("\t") for line in (out / "item_mapping.tsv").read_text().split("\n")
                   if line)
    assert {k: int(v) for k, v in mapping.items()} == {"m1": 0, "m2": 1, "m3": 2, "m4": 3}
    manifest = write_shards(out, tmp_path / "shards", shard_size=3)        # same ids both sides
    assert manifest["n_items"] == 4 and manifest["n_written"] == 4


def test_min_rating_core_and_keep_policy(movies, tmp_path):
    summary = build_catalog(CatalogSpec(items=movies / "items.csv", out=tmp_path / "c",
                                        text="{title}. {overview}", image="posters/{movie_id}.jpg",
                                        missing="keep", interactions=movies / "ratings.csv",
                                        min_rating=3, core=2), log=lambda m: None)
    dropped = {rule: d["count"] for rule, d in summary["dropped"].items()}
    low = sum(1 + (u + i) % 5 < 3 for u in range(6) for i in range(4))
    assert dropped["interactions rated below 3"] == low
    assert "items without an image" not in dropped                     # kept: m5 stays listed
    inter = load_interactions(tmp_path / "c")
    full = (inter.csr("train") + inter.csr("valid") + inter.csr("test")).tocsr()
    assert (np.diff(full.indptr) >= 2).all() and (np.diff(full.tocsc().indptr) >= 2).all()
    kept = read_catalog(tmp_path / "c")
    assert len(kept) == summary["items"] == inter.n_items


def test_k_core_is_iterated_until_stable():
    # 2-core: item 2 has one interaction; without it user 2 has one left, so it goes too
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 0, 1, 0, 2])
    assert k_core(users, items, 2).tolist() == [True] * 4 + [False, False]
    assert k_core(users, items, 0).all()


def test_temporal_split_holds_out_each_users_latest():
    users = np.repeat(np.arange(2), 12)
    times = np.r_[np.arange(12)[::-1], np.arange(12)]
    labels = temporal_split_labels(users, times)
    assert labels[:12].tolist() == [TEST, VALID] + [TRAIN] * 10           # user 0: reversed time
    assert labels[12:].tolist() == [TRAIN] * 10 + [VALID, TEST]


def test_amazon_metadata_and_reviews(tmp_path):
    d = tmp_path / "amz"
    (d / "img").mkdir(parents=True)
    meta = ["{'asin': 'B01', 'title': 'Rattle', 'description': 'Soft.', 'imUrl': 'x'}",
            '{"asin": "B02", "title": "Cup", "description": ["Red.", "Plastic."]}',
            "{'asin': 'B03', 'title': 'Bib'}"]
    with gzip.open(d / "meta_Baby.json.gz", "wt") as f:
        f.write("\n".join(meta) + "\n")
    for a in ("B01", "B02", "B03"):
        _image(d / "img" / f"{a}.jpg")
    reviews = [{"reviewerID": f"A{u}", "asin": a, "overall": 5.0, "unixReviewTime": 100 + k}
               for k, (u, a) in enumerate([(u, a) for u in range(4) for a in ("B01", "B02")])]
    (d / "reviews.json").write_text("\n".join(json.dumps(r) for r in reviews) + "\n")
    assert main(["catalog", "--items", str(d / "meta_Baby.json.gz"), "--out", str(d / "cat"),
                 "--text", "{title}. {description}", "--image", "img/{asin}.jpg",
                 "--interactions", str(d / "reviews.json"), "--split", "temporal"]) == 0
    summary = json.loads((d / "cat" / "catalog.json").read_text())
    assert summary["dropped"] == {"items without interactions": {"count": 1, "first": ["B03"]}}
    assert summary["columns"] == {"user": "reviewerID", "item": "asin", "rating": "overall",
                                  "timestamp": "unixReviewTime"}
    texts = [it.encoder_text for it in read_catalog(d / "cat")]
    assert texts == ["Rattle. Soft.", "Cup. Red. Plastic."]


def test_bad_input_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "items.csv"
    bad.write_text('item_id,title\na,"x"\nb,y,extra\n')
    with pytest.raises(InputError, match=r"items\.csv:3: expected 2 fields"):
        list(read_rows(bad))
    literal = tmp_path / "meta.json"
    literal.write_text("{'asin': 'B01'}\n{'asin': \n")
    with pytest.raises(InputError, match=r"meta\.json:2: neither JSON nor a Python literal"):
        list(read_rows(literal))
    good = tmp_path / "ok.csv"
    good.write_text("item_id,title\na,x\n")
    assert main(["catalog", "--items", str(good), "--out", str(tmp_path / "o"),
                 "--text", "{title}. {plot}"]) == 2
    assert "no column 'plot'" in capsys.readouterr().err
    ratings = tmp_path / "r.csv"
    ratings.write_text("user_id,item_id,rating\nu1,a,5\nu2,a,five\n")
    with pytest.raises(InputError, match=r"r\.csv:3: rating: expected a finite number"):
        build_catalog(CatalogSpec(items=good, out=tmp_path / "o2", text="{title}",
                                  missing="keep", interactions=ratings), log=lambda m: None)


@pytest.mark.shared_data
def test_movielens_100k_with_posters_and_plots(tmp_path):
    """The real ML-100k: every rating's movie has a poster; the catalog keeps the items with a
    poster and a plot, and its interactions load with the same item index."""
    d = shared_dataset("ml100k-posters")
    summary = build_catalog(CatalogSpec(items=d / "items.csv", out=tmp_path / "ml",
                                        title="title", text="{overview}",
                                        image="posters/{movie_id}.jpg",
                                        interactions=d / "ratings.csv"), log=lambda m: None)
    assert summary["users"] == 943
    assert summary["items"] == summary["with_image"] == summary["with_text"]
    dropped = summary["dropped"]
    unknown = dropped.get("interactions with an item not in the table (or dropped from it)",
                          {"count": 0})["count"]
    assert summary["interactions"] + unknown == 99815
    inter = load_interactions(tmp_path / "ml")
    assert inter.n_items == summary["items"] == len(read_catalog(tmp_path / "ml"))

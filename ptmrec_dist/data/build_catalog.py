"""``ptmrec catalog``: a user's item table (+ interactions) -> the catalog ``ptmrec shard`` reads.

Output folder:

* ``items.jsonl`` (``item_id`` = the item index, ``raw_id``, ``title``, ``text``, ``image``) and
  ``images/`` (hard links to the user's files where the file system allows, else copies);
* with interactions: ``interactions.inter`` (MMRec format: indices, ``x_label`` split, rating and
  timestamp when known), ``user_mapping.tsv`` / ``item_mapping.tsv`` (raw id -> index);
* ``catalog.json``: items, users, interactions, how many have an image / a text, and what each
  rule dropped (with the first few ids), also printed.

Item indices follow the item table's order over the items that survive every rule, so the
interactions, the shards, the features and every stage share one index. Nothing is dropped
without being counted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptmrec_dist.data.ingest import ITEM_COLUMNS, Template, cell_text, pick_column, \
    read_interactions, read_rows, table_format
from ptmrec_dist.data.splits import SPLIT_NAMES, random_split_labels, temporal_split_labels
from ptmrec_dist.errors import InputError
from ptmrec_dist.io import atomic_write_json, atomic_write_text
from ptmrec_dist.logs import get_logger, progress

_log = get_logger(__name__)

FIRST_IDS = 5          # ids named per drop rule


@dataclass
class CatalogSpec:
    items: Path
    out: Path
    id_column: str | None = None
    text: str = "{title}. {text}"
    title: str | None = None              # a column, or a template
    image: str | None = None              # a path pattern over columns, relative to the table
    image_column: str | None = None       # or a column of paths
    missing: str = "drop"                 # drop | keep (items without image or text)
    interactions: Path | None = None
    user_column: str | None = None
    item_column: str | None = None
    rating_column: str | None = None
    time_column: str | None = None
    min_rating: float | None = None
    core: int = 0
    split: str = "random"                 # random | temporal
    split_seed: int = 2026

    @classmethod
    def from_args(cls, args, split_seed: int) -> "CatalogSpec":
        return cls(items=args.items, out=args.out, id_column=args.id_column, text=args.text,
                   title=args.title, image=args.image, image_column=args.image_column,
                   missing=args.missing, interactions=args.interactions,
                   user_column=args.user_column, item_column=args.item_column,
                   rating_column=args.rating_column, time_column=args.time_column,
                   min_rating=args.min_rating, core=args.core, split=args.split,
                   split_seed=split_seed)


def add_catalog_arguments(p) -> None:
    """``ptmrec catalog``'s options: the fields of :class:`CatalogSpec`."""
    p.add_argument("--items", required=True, type=Path,
                   help="item table: .csv, .tsv, .jsonl or Amazon metadata .json (.gz too)")
    p.add_argument("--out", required=True, type=Path, help="catalog folder to write")
    p.add_argument("--id-column", help="the items' id column (default: item_id, movie_id, asin, "
                                       "...)")
    p.add_argument("--text", default="{title}. {text}",
                   help="text template over columns; missing fields are dropped with their "
                        "separator (default '{title}. {text}')")
    p.add_argument("--title", help="title column or template (default: none)")
    p.add_argument("--image", help="image path pattern over columns, relative to the table's "
                                   "folder, e.g. 'posters/{movie_id}.jpg'")
    p.add_argument("--image-column", help="or: a column of image paths")
    p.add_argument("--missing", choices=["drop", "keep"], default="drop",
                   help="items without an image or a text: drop (counted) or keep")
    p.add_argument("--interactions", type=Path,
                   help="user,item[,rating][,timestamp] as .csv/.tsv with a header, or review "
                        ".jsonl (reviewerID, asin, overall, unixReviewTime)")
    p.add_argument("--user-column", help="default: user_id, user, reviewerID, ...")
    p.add_argument("--item-column", help="default: item_id, movie_id, asin, ...")
    p.add_argument("--rating-column", help="default: rating, overall, ...")
    p.add_argument("--time-column", help="default: timestamp, unix_timestamp, unixReviewTime")
    p.add_argument("--min-rating", type=float, help="keep interactions rated at least this")
    p.add_argument("--core", type=int, default=0,
                   help="k-core: users and items with at least K interactions, repeated "
                        "(Amazon 5-core: 5)")
    p.add_argument("--split", choices=["random", "temporal"], default="random",
                   help="MMRec's random per-user split (data.split_seed) or the latest "
                        "interactions of each user as valid/test")


class Drops:
    """Counts (and the first ids) of everything a rule removed."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, list[str]] = {}

    def add(self, rule: str, ids, count: int | None = None) -> None:
        """``ids`` removed (or, with ``count``, the ids to name for ``count`` removed rows)."""
        ids = list(ids)
        count = len(ids) if count is None else int(count)
        if count:
            self.counts[rule] = self.counts.get(rule, 0) + count
            self.first.setdefault(rule, []).extend(str(i) for i in ids[:FIRST_IDS])
            self.first[rule] = self.first[rule][:FIRST_IDS]

    def summary(self) -> dict:
        return {rule: {"count": n, "first": self.first[rule]} for rule, n in self.counts.items()}


def read_items(spec: CatalogSpec, drops: Drops) -> list[dict]:
    """The item table's rows as ``{raw_id, title, text, image (absolute path or "")}``, first
    row per id; the missing-image/text policy applied. An image path (``--image`` filled in, or
    ``--image-column``) that leads outside the table's folder is an InputError naming the line."""
    text_tpl = Template(spec.text, "--text")
    title = spec.title or ""                 # a column name, or a template
    title_tpl = Template(title if "{" in title or not title else "{" + title + "}", "--title")
    image_tpl = Template(spec.image, "--image") if spec.image else None
    root = spec.items.parent
    items, seen, checked = [], set(), False
    for line_no, row in progress(read_rows(spec.items), desc="items", unit="row"):
        if not checked:
            id_col = pick_column(spec.items, list(row), spec.id_column, ITEM_COLUMNS, "id")
            for tpl in (text_tpl, title_tpl, image_tpl):
                missing = tpl.missing_columns(row) if tpl else []
                if missing and table_format(spec.items) != "jsonl":   # JSON rows vary in keys
                    raise InputError(spec.items, f"no column {missing[0]!r} for {tpl.template!r}"
                                                 f" (columns: {', '.join(row)})")
            if spec.image_column and spec.image_column not in row:
                raise InputError(spec.items, f"no column {spec.image_column!r} for "
                                             "--image-column")
            checked = True
        raw_id = cell_text(row.get(id_col))
        if not raw_id:
            raise InputError(spec.items, "empty id", line=line_no, field=id_col)
        if raw_id in seen:
            drops.add("duplicate item rows (first kept)", [raw_id])
            continue
        seen.add(raw_id)
        image = ""
        rel = image_tpl.render(row) if image_tpl else cell_text(row.get(spec.image_column))
        why = _leaves_folder(rel) if rel else None
        if why:
            raise InputError(spec.items, f"{rel!r} is outside the item table's folder {root}: "
                                         f"{why} (image paths are relative to that folder and "
                                         "stay inside it; link a folder of images in if they "
                                         "live elsewhere)", line=line_no,
                             field=spec.image_column or "--image")
        if rel and (root / rel).is_file():
            image = str((root / rel).resolve())
        items.append({"raw_id": raw_id, "title": title_tpl.render(row),
                      "text": text_tpl.render(row), "image": image, "line": line_no})
    if not items:
        raise InputError(spec.items, "the item table has no rows")
    if spec.missing == "drop":     # a text is what the encoder reads: title and/or text
        for rule, has in (("items without an image", lambda it: it["image"]),
                          ("items without a text", lambda it: it["title"] or it["text"])):
            drops.add(rule, [it["raw_id"] for it in items if not has(it)])
            items = [it for it in items if has(it)]
    return items


def _leaves_folder(rel: str) -> str | None:
    """Why the image path ``rel`` (a pattern filled in, or a column value) leaves the item
    table's folder, or None. Lexical: absolute paths and ``..`` that climbs out are refused;
    symbolic links inside the folder are followed (the table and its folder are the user's own
    input, and ``write_catalog`` copies or hard-links every image into the catalog it writes)."""
    if os.path.isabs(rel):
        return "an absolute path"
    if os.path.normpath(rel).split(os.sep)[0] == "..":
        return "it climbs out with '..'"
    return None


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions in the k-core: users and items with at least ``k`` interactions,
    repeated until stable (as the Amazon 5-core sets)."""
    keep = np.ones(len(users), dtype=bool)
    while k > 1:
        u_deg = np.bincount(users[keep], minlength=users.max() + 1 if len(users) else 0)
        i_deg = np.bincount(items[keep], minlength=items.max() + 1 if len(items) else 0)
        now = keep & (u_deg[users] >= k) & (i_deg[items] >= k)
        if now.sum() == keep.sum():
            break
        keep = now
    return keep


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique raw ids, code of each value); numeric ids sort as numbers."""
    uniq = np.unique(values)
    if all(str(u).isdecimal() for u in uniq):
        uniq = np.array(sorted(uniq, key=int), dtype=object)
    lookup = {u: i for i, u in enumerate(uniq.tolist())}
    return uniq, np.array([lookup[v] for v in values.tolist()], dtype=np.int64)


def filter_interactions(spec: CatalogSpec, items: list[dict], drops: Drops) -> dict:
    """Interactions of the catalog's items: rating threshold, duplicates, unknown items, k-core;
    the items without any interaction left are dropped from ``items`` (in place)."""
    raw = read_interactions(spec.interactions, spec.user_column, spec.item_column,
                            spec.rating_column, spec.time_column)
    users, its = raw["users"], raw["items"]
    keep = np.ones(len(users), dtype=bool)
    if spec.min_rating is not None:
        if raw["ratings"] is None:
            raise InputError(spec.interactions, "--min-rating needs a rating column")
        low = raw["ratings"] < spec.min_rating
        drops.add(f"interactions rated below {spec.min_rating:g}",
                  [f"{u}:{i}" for u, i in zip(users[low], its[low])])
        keep &= ~low
    pairs = np.char.add(np.char.add(users.astype(str), "\t"), its.astype(str))   # ids hold no tab
    _, first = np.unique(pairs, return_index=True)
    dup = np.ones(len(users), dtype=bool)
    dup[first] = False
    drops.add("duplicate interactions (first kept)",
              [f"{u}:{i}" for u, i in zip(users[dup & keep], its[dup & keep])])
    keep &= ~dup
    known = {it["raw_id"] for it in items}
    unknown = keep & ~np.isin(its, list(known))
    drops.add("interactions with an item not in the table (or dropped from it)",
              list(dict.fromkeys(its[unknown].tolist())), count=unknown.sum())
    keep &= ~unknown
    _, user_code = _codes(users[keep])
    _, item_code = _codes(its[keep])
    core = k_core(user_code, item_code, spec.core)
    if spec.core > 1:
        drops.add(f"interactions outside the {spec.core}-core",
                  [f"{u}:{i}" for u, i in zip(users[keep][~core], its[keep][~core])])
    rows = np.flatnonzero(keep)[core]
    present = set(its[rows].tolist())
    drops.add("items without interactions" + (f" in the {spec.core}-core" if spec.core > 1
                                              else ""),
              [it["raw_id"] for it in items if it["raw_id"] not in present])
    items[:] = [it for it in items if it["raw_id"] in present]
    return {"users": users[rows], "items": its[rows], "lines": raw["lines"][rows],
            "ratings": None if raw["ratings"] is None else raw["ratings"][rows],
            "timestamps": None if raw["timestamps"] is None else raw["timestamps"][rows],
            "columns": raw["columns"]}


def split_labels(spec: CatalogSpec, user_index: np.ndarray, timestamps) -> np.ndarray:
    if spec.split == "temporal":
        if timestamps is None:
            raise InputError(spec.interactions, "--split temporal needs a timestamp column")
        return temporal_split_labels(user_index, timestamps)
    return random_split_labels(user_index, spec.split_seed)


def _number(value: float) -> str:
    """Exactly as read: integers without a decimal point (timestamps keep every digit)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _place_image(src: str, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:                      # another file system, or no hard links
        shutil.copyfile(src, dest)


def write_catalog(spec: CatalogSpec, items: list[dict], inter: dict | None) -> dict:
    out = spec.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, it in enumerate(progress(items, desc="catalog", unit="item")):
        image = ""
        if it["image"]:
            image = f"images/{index:09d}{Path(it['image']).suffix.lower()}"
            _place_image(it["image"], out / image)
        lines.append(json.dumps({"item_id": index, "raw_id": it["raw_id"], "title": it["title"],
                                 "text": it["text"], "image": image}, ensure_ascii=False))
    atomic_write_text(out / "items.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "item_mapping.tsv",
                      "".join(f"{it['raw_id']}\t{i}\n" for i, it in enumerate(items)))
    if inter is None:
        return {}
    item_index = {it["raw_id"]: i for i, it in enumerate(items)}
    user_ids, user_index = _codes(inter["users"])
    item_col = np.array([item_index[i] for i in inter["items"].tolist()], dtype=np.int64)
    labels = split_labels(spec, user_index, inter["timestamps"])
    header = ["userID:token", "itemID:token"]
    cols = [user_index.astype(str), item_col.astype(str)]
    for key, name in (("ratings", "rating:float"), ("timestamps", "timestamp:float")):
        if inter[key] is not None:
            header.append(name)
            cols.append(np.array([_number(v) for v in inter[key]]))
    header.append("x_label:token")
    cols.append(labels.astype(str))
    body = "\n".join("\t".join(r) for r in zip(*[c.tolist() for c in cols]))
    atomic_write_text(out / "interactions.inter", "\t".join(header) + "\n" + body + "\n")
    atomic_write_text(out / "user_mapping.tsv",
                      "".join(f"{u}\t{i}\n" for i, u in enumerate(user_ids.tolist())))
    return {"users": len(user_ids), "interactions": len(user_index),
            "splits": {name: int((labels == k).sum()) for k, name in enumerate(SPLIT_NAMES)},
            "split": spec.split, "columns": inter["columns"]}


def build_catalog(spec: CatalogSpec, log=None) -> dict:
    """The whole command; returns the summary written to ``OUT/catalog.json``, whose table
    goes to ``log`` (default: this module's logger; ``ptmrec catalog`` prints it)."""
    log = log or _log.info
    spec.out.mkdir(parents=True, exist_ok=True)
    drops = Drops()
    items = read_items(spec, drops)
    inter = filter_interactions(spec, items, drops) if spec.interactions else None
    if not items:
        raise InputError(spec.items, "no item is left after the rules (see the counts: "
                                     f"{drops.counts})")
    stats = write_catalog(spec, items, inter)
    summary = {"items": len(items), **stats,
               "with_image": sum(bool(it["image"]) for it in items),
               "with_text": sum(bool(it["title"] or it["text"]) for it in items),
               "dropped": drops.summary(),
               "sources": {"items": str(spec.items),
                           "interactions": str(spec.interactions) if spec.interactions else None},
               "rules": {"text": spec.text, "missing": spec.missing,
                         "min_rating": spec.min_rating, "core": spec.core,
                         "split": spec.split if inter else None,
                         "split_seed": spec.split_seed if inter and spec.split == "random"
                         else None}}
    atomic_write_json(spec.out / "catalog.json", summary)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"items:         {summary['items']}  (with image {summary['with_image']}, "
             f"with text {summary['with_text']})"]
    if "users" in summary:
        s = summary["splits"]
        lines += [f"users:         {summary['users']}",
                  f"interactions:  {summary['interactions']}  (train {s['train']} / valid "
                  f"{s['valid']} / test {s['test']}, split {summary['split']})"]
    for rule, d in summary["dropped"].items():
        lines.append(f"dropped:       {d['count']} {rule} (first: {', '.join(d['first'])})")
    return "\n".join(lines)

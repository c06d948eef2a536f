"""Synthetic multimodal catalog with a known domain gap (``ptmrec make-data synthetic``).

Items have five attributes. Generic captions (what a small CLIP is pretrained on) name only
``category`` and ``colour``; users care mostly about ``pattern`` (image only), ``material`` (text
only) and ``shape``. Frozen caption-pretrained features thus miss what drives interactions, which
stage-2 prompt tuning can recover. The model and the file formats are in docs/data.md.

Everything is a function of ``cfg.seed`` (and ``split_seed`` for x_label): per-item RNGs make the
output independent of the number of worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ptmrec_dist import logs, seeds
from ptmrec_dist.config import Config, SyntheticConfig
from ptmrec_dist.data.splits import SPLIT_NAMES, random_split_labels
from ptmrec_dist.errors import ConfigError, SkipReport
from ptmrec_dist.io import atomic_write_bytes, atomic_write_json, atomic_write_text, dumps_json

# --------------------------------------------------------------------------- vocabularies
ATTRIBUTES = ("category", "colour", "shape", "pattern", "material")
CATEGORIES = ("rattle", "bottle", "blanket", "bib", "sock", "teether", "mobile", "cup")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
COLOUR_RGB = np.array([(215, 40, 40), (245, 135, 20), (245, 215, 35), (50, 160, 70),
                       (40, 90, 215), (135, 60, 180), (245, 130, 190), (125, 80, 40)], np.float64)
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart", "diamond", "cross")
PATTERNS = ("solid", "stripes", "dots", "checks", "zigzag", "grid")
MATERIALS = ("cotton", "plastic", "wood", "silicone", "wool", "bamboo")
VOCAB = dict(zip(ATTRIBUTES, (CATEGORIES, COLOURS, SHAPES, PATTERNS, MATERIALS)))
SYNONYMS = {
    "category": [["rattle", "baby rattle", "shaker rattle"],
                 ["bottle", "feeding bottle", "baby bottle"],
                 ["blanket", "swaddle blanket", "baby blanket"],
                 ["bib", "feeding bib", "drool bib"],
                 ["sock", "baby sock", "infant sock"], ["teether", "teething toy", "teething ring"],
                 ["mobile", "crib mobile", "cot mobile"], ["cup", "sippy cup", "training cup"]],
    "colour": [["red", "crimson", "scarlet"], ["orange", "tangerine", "amber"],
               ["yellow", "lemon", "golden"], ["green", "emerald", "leaf green"],
               ["blue", "cobalt", "sky blue"], ["purple", "violet", "plum"],
               ["pink", "rose", "blush pink"], ["brown", "chocolate", "chestnut"]],
    "shape": [[s] for s in SHAPES],
    "material": [["cotton", "organic cotton", "soft cotton"], ["plastic", "BPA-free plastic",
                 "recycled plastic"], ["wood", "natural wood", "beech wood"],
                 ["silicone", "food-grade silicone", "soft silicone"],
                 ["wool", "merino wool", "knitted wool"],
                 ["bamboo", "bamboo fibre", "organic bamboo"]],
}
# Each category's canonical shape (drawn with prob CANONICAL_SHAPE_PROB, else uniform).
CANONICAL_SHAPE = (0, 4, 1, 5, 6, 3, 2, 7)  # rattle circle, bottle hexagon, blanket square, ...
CANONICAL_SHAPE_PROB = 0.6
IMPORTANCE = {"category": 0.3, "colour": 0.3, "shape": 0.6, "pattern": 1.0, "material": 1.0}
VISIBILITY = {"category": ["text", "caption"], "colour": ["image", "text", "caption"],
              "shape": ["image", "text"], "pattern": ["image"], "material": ["text"]}
CAPTION_ATTRIBUTES = ("category", "colour")
# synthetic.caption_mention_prob: a caption also names each of these with that probability
CAPTION_MENTIONS = ("pattern", "shape", "material")
PATTERN_WORDS = ("plain", "striped", "polka-dot", "checked", "zigzag", "grid-patterned")
PREF_NOISE, PREF_LIKE = 0.5, 2.0      # pref = N(0, 0.5) + 2.0 on 1-2 liked values per attribute
POP_SIGMA = 1.0                       # popularity ~ lognormal(0, 1)
USER_CHUNK = 512                      # users per vectorised Gumbel-top-k block
IMAGE_CHUNK = 250                     # items per worker task
POOL_MIN_ITEMS = 400                  # below this, render in-process
JPEG_QUALITY = 90

CAPTION_TEMPLATES = ("a photo of {a} {col} {cat}", "{a} {col} {cat}",
                     "a picture of {a} {col} {cat}",
                     "an image of {a} {col} {cat}", "a close-up photo of {a} {col} {cat}")
TITLE_TEMPLATES = ("{Col} {Shape} {Cat}", "{Cat} in {Col}, {Shape} Design", "{Shape} {Col} {Cat}")
IDENTITY_TEMPLATES = ("This {col} {cat} is {shape}-shaped.",
                      "A {col} {cat} with a {shape} silhouette.",
                      "Our {col} {cat} comes in a {shape} shape.")
MATERIAL_TEMPLATES = ("Made of {mat}.", "Crafted from {mat}.", "It is made from {mat}.",
                      "Material: {mat}.")
FILLERS = ("Perfect for newborns and toddlers.", "Easy to clean and care for.",
           "A lovely gift for a baby shower.", "Designed for little hands.",
           "Meets all applicable safety standards.", "Lightweight and easy to pack.",
           "Loved by parents and babies alike.", "Ships in recyclable packaging.")


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def image_name(index: int) -> str:
    return f"images/{index:09d}.jpg"


# --------------------------------------------------------------------------- texts
def caption_mentions(seed: int, index: int, mention_prob: float) -> tuple[str, ...]:
    """The hidden attributes (of CAPTION_MENTIONS) one item's caption also names: each with
    probability ``mention_prob``, from the item's own stream (none at 0, no draw)."""
    if mention_prob <= 0:
        return ()
    rng = np.random.default_rng([seed, seeds.SYN_CAPTION_MENTION, index])
    hit = rng.random(len(CAPTION_MENTIONS)) < mention_prob
    return tuple(a for a, h in zip(CAPTION_MENTIONS, hit) if h)


def item_texts(seed: int, index: int, attrs: dict[str, int],
               mention_prob: float = 0.0) -> tuple[str, str, str]:
    """(title, text, generic caption) of one item; the text never names the pattern. The
    caption names category and colour, and each hidden attribute of ``caption_mentions``
    (``"a photo of a red striped star-shaped rattle made of wool"``)."""
    rng = np.random.default_rng([seed, seeds.SYN_ITEM_TEXT, index])
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    col = pick(SYNONYMS["colour"][attrs["colour"]])
    cat = pick(SYNONYMS["category"][attrs["category"]])
    mat = pick(SYNONYMS["material"][attrs["material"]])
    shape = SHAPES[attrs["shape"]]
    title = pick(TITLE_TEMPLATES).format(Col=col.title(), Cat=cat.title(), Shape=shape.title())
    body = [pick(MATERIAL_TEMPLATES).format(mat=mat)]
    n_fill = int(rng.integers(1, 3))
    body += [FILLERS[i] for i in rng.choice(len(FILLERS), size=n_fill, replace=False)]
    body = [body[i] for i in rng.permutation(len(body))]
    text = " ".join([pick(IDENTITY_TEMPLATES).format(col=col, cat=cat, shape=shape)] + body)
    c_col, c_cat = COLOURS[attrs["colour"]], CATEGORIES[attrs["category"]]
    template = pick(CAPTION_TEMPLATES)
    mentioned = caption_mentions(seed, index, mention_prob)
    words = [c_col]
    if "pattern" in mentioned:
        words.append(PATTERN_WORDS[attrs["pattern"]])
    if "shape" in mentioned:
        words.append(f"{SHAPES[attrs['shape']]}-shaped")
    caption = template.format(a=_article(c_col), col=" ".join(words), cat=c_cat)
    if "material" in mentioned:
        caption += f" made of {MATERIALS[attrs['material']]}"
    return title, text, caption


# --------------------------------------------------------------------------- images
def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        ang, rad = np.arange(4) * np.pi / 2 + np.pi / 4, np.full(4, r * 1.15)
    elif shape == "triangle":
        ang, rad = np.arange(3) * 2 * np.pi / 3 - np.pi / 2, np.full(3, r * 1.2)
        cy += 0.2 * r
    elif shape == "star":
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.48)
    elif shape == "hexagon":
        ang, rad = np.arange(6) * np.pi / 3, np.full(6, r * 1.05)
    elif shape == "diamond":
        ang, rad = np.arange(4) * np.pi / 2 - np.pi / 2, np.array([1.2, 0.8, 1.2, 0.8]) * r
    elif shape == "cross":
        a, b = 0.38 * r, 1.1 * r
        pts = np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                        (-a, a), (-b, a), (-b, -a), (-a, -a)])
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
        ang, rad = np.arctan2(y, x), np.hypot(x, y) * r / 14.5
    else:
        raise ValueError(shape)
    ang = ang + rot
    return list(zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist()))


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    return yy, xx


def _pattern_mask(pattern: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (n, n) mask of the pattern's foreground strokes (before clipping to the shape)."""
    yy, xx = _grid(n)
    p = n * rng.uniform(0.15, 0.19)                     # period
    ox, oy = rng.uniform(0, p, 2)
    x, y = xx + ox, yy + oy
    if pattern == "solid":
        return np.zeros((n, n), bool)
    if pattern == "stripes":
        th = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-8, 8))
        return np.mod(x * np.cos(th) + y * np.sin(th), p) < 0.45 * p
    if pattern == "dots":
        return (np.mod(x, p) - p / 2) ** 2 + (np.mod(y, p) - p / 2) ** 2 < (0.3 * p) ** 2
    if pattern == "checks":
        c = 0.6 * p
        return (np.floor(x / c) + np.floor(y / c)) % 2 == 0
    if pattern == "zigzag":
        tri = np.abs(np.mod(x, p) - p / 2)              # triangle wave, amplitude p/2
        return np.mod(y + tri, p) < 0.35 * p
    if pattern == "grid":
        w = 0.22 * p
        return (np.mod(x, p) < w) | (np.mod(y, p) < w)
    raise ValueError(pattern)


def render_image(seed: int, index: int, size: int, colour: int, shape: int, pattern: int) -> bytes:
    """JPEG bytes of one item image; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, seeds.SYN_ITEM_IMAGE, index])
    n = 2 * size                                        # 2x supersampling, then box-downscale
    bg = np.clip(rng.uniform(222, 250) + rng.uniform(-8, 8, 3), 0, 255)
    base = np.clip(COLOUR_RGB[colour] + rng.normal(0, 8, 3), 0, 255)
    lum = base @ np.array([0.299, 0.587, 0.114])
    # contrasting pattern colour of the same hue: a light tint on dark colours, a dark shade else
    ink = base + 0.65 * (255 - base) if lum < 150 else base * 0.35
    r = n * rng.uniform(0.27, 0.34)
    cx, cy = n / 2 + n * rng.uniform(-0.06, 0.06, 2)
    rot = np.deg2rad(rng.uniform(-12, 12))
    m = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(m)
    if SHAPES[shape] == "circle":
        draw.ellipse([cx - r * 1.05, cy - r * 1.05, cx + r * 1.05, cy + r * 1.05], fill=255)
    else:
        draw.polygon(_polygon(SHAPES[shape], cx, cy, r, rot), fill=255)
    inside = np.asarray(m, dtype=np.float32)[..., None] * np.float32(1 / 255)
    pat = _pattern_mask(PATTERNS[pattern], n, rng)[..., None]
    fg = np.where(pat, ink.astype(np.float32), base.astype(np.float32))
    img = bg.astype(np.float32) + inside * (fg - bg.astype(np.float32))
    img = 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB").save(
        out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _render_chunk(args) -> int:
    out_dir, seed, size, start, colour, shape, pattern = args
    for j in range(len(colour)):
        data = render_image(seed, start + j, size, int(colour[j]), int(shape[j]), int(pattern[j]))
        atomic_write_bytes(Path(out_dir) / image_name(start + j), data)
    return len(colour)


def _render_all(out_dir: Path, cfg: SyntheticConfig, item_attrs: dict[str, np.ndarray],
                workers: int, progress: bool) -> None:
    n = cfg.n_items
    tasks = [(str(out_dir), cfg.seed, cfg.image_size, s, item_attrs["colour"][s:s + IMAGE_CHUNK],
              item_attrs["shape"][s:s + IMAGE_CHUNK], item_attrs["pattern"][s:s + IMAGE_CHUNK])
             for s in range(0, n, IMAGE_CHUNK)]
    bar = logs.progress(total=n, desc="images", unit="img", enabled=progress)
    try:
        with _mapped(_render_chunk, tasks, workers if n >= POOL_MIN_ITEMS else 1,
                     ordered=False) as done_iter:
            for done in done_iter:
                bar.update(done)
    finally:
        bar.close()


@contextlib.contextmanager
def _mapped(fn, tasks: list, workers: int, ordered: bool):
    """``fn`` over ``tasks``: in a pool of ``min(workers, len(tasks))`` processes where
    ``workers`` > 1 and there is more than one task, else in this process; results in task order
    with ``ordered``, else as they come. The pool is closed at the end, killed on an error."""
    if workers <= 1 or len(tasks) <= 1:
        yield map(fn, tasks)
        return
    # fork where there is one: no `if __name__ == "__main__"` guard needed in the caller's
    # script; workers touch only numpy/PIL. The bar (logs.progress) starts no thread.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(min(workers, len(tasks)))
    try:
        yield (pool.imap if ordered else pool.imap_unordered)(fn, tasks)
        pool.close()
    finally:
        pool.terminate()                                # no-op after close(); kills on error
        pool.join()


def _shard_task(args) -> tuple[dict, str, str]:
    """Render, describe and write one shard (``ptmrec shard``'s tar layout and bytes); returns
    its manifest entry and its items' items.jsonl and captions.jsonl lines."""
    from ptmrec_dist.data.catalog import CatalogItem
    from ptmrec_dist.data.shards import _write_one, shard_name

    shard_dir, k, seed, size, start, attrs, mention_prob = args
    items, images, item_lines, cap_lines = [], [], [], []
    for j in range(len(attrs["colour"])):
        i = start + j
        one = {a: int(attrs[a][j]) for a in ATTRIBUTES}
        title, text, caption = item_texts(seed, i, one, mention_prob)
        items.append(CatalogItem(item_id=str(i), title=title, text=text, image="", line=i + 1,
                                 index=i))
        images.append(render_image(seed, i, size, one["colour"], one["shape"], one["pattern"]))
        item_lines.append(json.dumps({"item_id": i, "title": title, "text": text}) + "\n")
        cap_lines.append(json.dumps({"item_id": i, "caption": caption}) + "\n")
    entry = _write_one(Path(shard_dir) / shard_name(k), items, images)
    return entry, "".join(item_lines), "".join(cap_lines)


def _write_shards_direct(out: Path, shard_dir: Path, cfg: SyntheticConfig,
                         item_attrs: dict[str, np.ndarray], shard_size: int, workers: int,
                         progress: bool, interactions: Path) -> dict:
    """Shards straight from the generator, one shard per task in parallel processes, no image
    files; the tars are byte for byte what ``ptmrec shard OUT --shard-size N`` makes of the
    folder the generator writes without ``shards``. items.jsonl and captions.jsonl are written
    from the tasks' lines (items.jsonl has no ``image``: the images live in the shards only)."""
    from ptmrec_dist.data.shards import MANIFEST, finish_shards
    from ptmrec_dist.io import run_lock

    n = cfg.n_items
    tasks = [(str(shard_dir), k, cfg.seed, cfg.image_size, s,
              {a: item_attrs[a][s:s + shard_size] for a in ATTRIBUTES}, cfg.caption_mention_prob)
             for k, s in enumerate(range(0, n, shard_size))]
    shard_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(shard_dir, "ptmrec make-data synthetic"):
        (shard_dir / MANIFEST).unlink(missing_ok=True)
        bar = logs.progress(total=n, desc="shards", unit="item", enabled=progress)
        entries = []
        try:
            with open(out / ".items.jsonl.tmp", "w", encoding="utf-8") as items_f, \
                    open(out / ".captions.jsonl.tmp", "w", encoding="utf-8") as caps_f, \
                    _mapped(_shard_task, tasks, workers, ordered=True) as results:
                # ordered: the text files are written in item order as the shards complete
                for entry, item_lines, cap_lines in results:
                    entries.append(entry)
                    items_f.write(item_lines)
                    caps_f.write(cap_lines)
                    bar.update(entry["n_items"])
        finally:
            bar.close()
        os.replace(out / ".items.jsonl.tmp", out / "items.jsonl")
        os.replace(out / ".captions.jsonl.tmp", out / "captions.jsonl")
        return finish_shards(shard_dir, entries, catalog=out, interactions=interactions,
                             n_items=n, n_written=n, n_missing=0, image_size=0,
                             shard_size=shard_size, skipped=SkipReport())


# --------------------------------------------------------------------------- model
def sample_items(cfg: SyntheticConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-item attribute value indices and popularity (lognormal)."""
    rng = np.random.default_rng([cfg.seed, seeds.SYN_ITEMS])
    n = cfg.n_items
    cat = rng.integers(len(CATEGORIES), size=n)
    colour = rng.integers(len(COLOURS), size=n)
    canon = rng.random(n) < CANONICAL_SHAPE_PROB
    shape = np.where(canon, np.asarray(CANONICAL_SHAPE)[cat], rng.integers(len(SHAPES), size=n))
    pattern = rng.integers(len(PATTERNS), size=n)
    material = rng.integers(len(MATERIALS), size=n)
    pop = rng.lognormal(0.0, POP_SIGMA, size=n)
    return dict(zip(ATTRIBUTES, (cat, colour, shape, pattern, material))), pop


def sample_users(cfg: SyntheticConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-user preference vectors {attr: (n_users, n_values)} and interaction counts k_u."""
    rng = np.random.default_rng([cfg.seed, seeds.SYN_USERS])
    u = cfg.n_users
    prefs = {}
    for a in ATTRIBUTES:
        v = len(VOCAB[a])
        n_liked = rng.integers(1, 3, size=u)            # 1 or 2 strongly liked values
        rank = np.argsort(rng.random((u, v)), axis=1).argsort(axis=1)
        prefs[a] = rng.normal(0, PREF_NOISE, (u, v)) + PREF_LIKE * (rank < n_liked[:, None])
    extra_mean = cfg.mean_interactions - cfg.min_interactions
    extra = (rng.geometric(1.0 / (extra_mean + 1.0), size=u) - 1) if extra_mean > 0 \
        else np.zeros(u, np.int64)
    k = np.minimum(cfg.min_interactions + extra, cfg.n_items // 2)
    return prefs, k.astype(np.int64)


def _type_codes(item_attrs) -> tuple[np.ndarray, np.ndarray]:
    """Per item the two joint codes of :func:`utility`: (category, colour, shape) and (pattern,
    material). Items with both codes equal differ in utility only by popularity."""
    c1 = (item_attrs["category"] * len(COLOURS) + item_attrs["colour"]) * len(SHAPES) \
        + item_attrs["shape"]
    c2 = item_attrs["pattern"] * len(MATERIALS) + item_attrs["material"]
    return c1, c2


def utility(prefs, item_attrs, log_pop, popularity_weight: float, users: np.ndarray) -> np.ndarray:
    """u(user, item) for the given users, all items: (len(users), n_items)."""
    w = {a: IMPORTANCE[a] * prefs[a][users] for a in ATTRIBUTES}     # (len(users), n_values)
    # two gathers over joint value codes instead of five:
    # (category, colour, shape) and (pattern, material); additions in a fixed order
    t1 = (w["category"][:, :, None, None] + w["colour"][:, None, :, None]
          + w["shape"][:, None, None, :]).reshape(len(users), -1)
    t2 = (w["pattern"][:, :, None] + w["material"][:, None, :]).reshape(len(users), -1)
    c1, c2 = _type_codes(item_attrs)
    out = t1[:, c1]
    out += t2[:, c2]
    out += popularity_weight * log_pop
    return out


def sample_interactions(cfg: SyntheticConfig, prefs, k: np.ndarray, item_attrs, pop) -> tuple:
    """Gumbel-top-k: k_u items per user without replacement from softmax(u / temperature)."""
    log_pop = np.log(pop)
    all_u, all_i = [], []
    for c, s in enumerate(range(0, cfg.n_users, USER_CHUNK)):
        users = np.arange(s, min(s + USER_CHUNK, cfg.n_users))
        rng = np.random.default_rng([cfg.seed, seeds.SYN_INTERACTIONS, c])
        score = utility(prefs, item_attrs, log_pop, cfg.popularity_weight, users) / cfg.temperature
        score += rng.gumbel(size=score.shape)
        kc = k[users]
        kmax = int(kc.max())
        top = np.argpartition(-score, kmax - 1, axis=1)[:, :kmax]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), 1), 1)
        keep = np.arange(kmax)[None, :] < kc[:, None]
        items = np.sort(np.where(keep, top, cfg.n_items), axis=1)   # sentinel sorts last
        valid = items < cfg.n_items
        all_u.append(np.broadcast_to(users[:, None], items.shape)[valid])
        all_i.append(items[valid])
    return np.concatenate(all_u).astype(np.int64), np.concatenate(all_i).astype(np.int64)


# --------------------------------------------------------------------------- grouped sampler
GROUPED_AUTO_ITEMS = 100_000          # sampler "auto": exact up to this many items
GROUPED_USER_CHUNK = 512              # users per block of (users x attribute types) logits


def sampler_kind(cfg: SyntheticConfig) -> str:
    """``exact`` or ``grouped`` (``auto``: exact up to GROUPED_AUTO_ITEMS items, so every data set
    of that size keeps its bytes)."""
    if cfg.sampler != "auto":
        return cfg.sampler
    return "exact" if cfg.n_items <= GROUPED_AUTO_ITEMS else "grouped"


def _distinct_first(cand: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of CAND (draws in order), a mask of the first K[row] distinct values and how many
    distinct values the row holds (drawing with replacement and skipping repeats is sampling
    without replacement)."""
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, 1)
    first_sorted = np.ones(cand.shape, bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.zeros(cand.shape, bool)
    np.put_along_axis(first, order, first_sorted, 1)
    rank = np.cumsum(first, axis=1)
    return first & (rank <= k[:, None]), rank[:, -1]


def sample_interactions_grouped(cfg: SyntheticConfig, prefs, k: np.ndarray, item_attrs,
                                pop) -> tuple:
    """The choice model of :func:`sample_interactions` (k_u items without replacement from
    softmax(utility / temperature)) without scoring every item for every user. An item's weight
    factors into its attribute type's (the same for all its items) and its popularity's:
    ``exp(u_type / T) * pop ** (w / T)``. Each draw picks a type from the user's softmax over
    types (weighted by the type's popularity mass), then an item of that type by popularity;
    repeats are skipped. Work is users x types (at most 18,432) plus users x k_u x log(items),
    not users x items. Same distribution as the exact sampler, other random numbers."""
    n_items, temp = cfg.n_items, cfg.temperature
    c1, c2 = _type_codes(item_attrs)
    code = c1 * (len(PATTERNS) * len(MATERIALS)) + c2
    order = np.argsort(code, kind="stable")             # items grouped by type
    types, start = np.unique(code[order], return_index=True)
    sizes = np.diff(np.append(start, n_items))
    lw = cfg.popularity_weight * np.log(pop[order]) / temp
    top = np.maximum.reduceat(lw, start)                # per type, for exp without overflow
    w = np.exp(lw - np.repeat(top, sizes))
    cum = np.cumsum(w)                                  # within a type: cum - cum before it
    before = np.append(0.0, cum)[start]
    mass = cum[start + sizes - 1] - before
    log_mass = top + np.log(mass)
    t_c1, t_c2 = types // (len(PATTERNS) * len(MATERIALS)), types % (len(PATTERNS) * len(MATERIALS))
    all_u, all_i = [], []
    for c, s in enumerate(range(0, cfg.n_users, GROUPED_USER_CHUNK)):
        users = np.arange(s, min(s + GROUPED_USER_CHUNK, cfg.n_users))
        rng = np.random.default_rng([cfg.seed, seeds.SYN_GROUPED, c])
        wt = {a: IMPORTANCE[a] * prefs[a][users] for a in ATTRIBUTES}
        t1 = (wt["category"][:, :, None, None] + wt["colour"][:, None, :, None]
              + wt["shape"][:, None, None, :]).reshape(len(users), -1)
        t2 = (wt["pattern"][:, :, None] + wt["material"][:, None, :]).reshape(len(users), -1)
        logit = (t1[:, t_c1] + t2[:, t_c2]) / temp + log_mass
        logit -= logit.max(axis=1, keepdims=True)
        cdf = np.cumsum(np.exp(logit), axis=1)
        cdf /= cdf[:, -1:]
        # one sorted array for all rows: row r's cdf lives in (r, r + 1]
        flat = (cdf + np.arange(len(users))[:, None]).ravel()
        kc = k[users]
        rows = np.arange(len(users))
        cand = np.empty((len(users), 0), np.int64)
        while True:
            m = 2 * int(kc[rows].max()) + 8
            u = rng.random((len(rows), m)) + rows[:, None]
            t = np.minimum(np.searchsorted(flat, u, side="right") - rows[:, None] * len(types),
                           len(types) - 1)
            v = before[t] + rng.random(t.shape) * mass[t]
            pos = np.clip(np.searchsorted(cum, v, side="right"), start[t], start[t] + sizes[t] - 1)
            new = order[pos]
            if cand.shape[1] == 0:
                cand = new
            else:     # rows still short: their earlier draws, then these
                grown = np.full((len(users), cand.shape[1] + m), -1, np.int64)
                grown[:, :cand.shape[1]] = cand
                grown[rows, cand.shape[1]:] = new
                cand = grown
            keep, distinct = _distinct_first(cand, kc)
            short = np.flatnonzero(distinct - (cand < 0).any(axis=1) < kc)
            if not len(short):
                break
            rows = short
        keep &= cand >= 0
        items = np.sort(np.where(keep, cand, n_items), axis=1)
        valid = items < n_items
        all_u.append(np.broadcast_to(users[:, None], items.shape)[valid])
        all_i.append(items[valid])
    return np.concatenate(all_u).astype(np.int64), np.concatenate(all_i).astype(np.int64)


def variance_share(prefs, item_attrs, log_pop, popularity_weight: float) -> dict[str, float]:
    """Share of the average per-user utility variance over items due to each term."""
    var = {}
    for a in ATTRIBUTES:
        freq = np.bincount(item_attrs[a], minlength=len(VOCAB[a])) / len(item_attrs[a])
        p = prefs[a]
        var[a] = float(np.mean(IMPORTANCE[a] ** 2 * (p ** 2 @ freq - (p @ freq) ** 2)))
    var["popularity"] = float(popularity_weight ** 2 * np.var(log_pop))
    total = sum(var.values()) or 1.0
    return {a: round(v / total, 4) for a, v in var.items()}


# --------------------------------------------------------------------------- driver
def _compact_json(obj: dict) -> str:
    """Top-level keys one per line, values compact (truth.json holds big per-user lists)."""
    lines = [f"  {json.dumps(k)}: {dumps_json(v, indent=None)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def generate(cfg: SyntheticConfig, out_dir: str | Path, split_seed: int = 2026,
             progress: bool = False, workers: int | None = None,
             shards: str | Path | None = None, shard_size: int = 1000) -> dict:
    """Write the synthetic benchmark into ``out_dir``; returns a summary dict. With ``shards``
    (a folder), the items go straight into WebDataset shards there (``shard_size`` items each,
    written by ``workers`` processes) and no image files are written."""
    t0 = time.perf_counter()
    Config(synthetic=cfg).validate()                    # ConfigError naming the synthetic.* key
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    out = Path(out_dir)
    if shard_size < 1:
        raise ConfigError(f"shard size (--shard-size) must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth.json").unlink(missing_ok=True)        # written last: present = complete
    if shards is None:
        (out / "images").mkdir(exist_ok=True)
        for stale in (out / "images").glob("*.jpg"):    # a previous, larger run into the same dir
            if re.fullmatch(r"\d{9}\.jpg", stale.name) and int(stale.stem) >= cfg.n_items:
                stale.unlink()

    item_attrs, pop = sample_items(cfg)
    prefs, k = sample_users(cfg)
    sampler = sampler_kind(cfg)
    draw = sample_interactions if sampler == "exact" else sample_interactions_grouped
    users, items = draw(cfg, prefs, k, item_attrs, pop)
    labels = random_split_labels(users, split_seed)
    rows = np.stack([users, items, labels.astype(np.int64)], axis=1)
    buf = io.StringIO()
    np.savetxt(buf, rows, fmt="%d", delimiter="\t")
    atomic_write_text(out / "interactions.inter", "userID\titemID\tx_label\n" + buf.getvalue())
    del buf, rows

    if shards is not None:
        _write_shards_direct(out, Path(shards), cfg, item_attrs, shard_size, workers, progress,
                             out / "interactions.inter")
    else:
        _render_all(out, cfg, item_attrs, workers, progress)
        item_lines, cap_lines = [], []
        for i in range(cfg.n_items):
            attrs = {a: int(item_attrs[a][i]) for a in ATTRIBUTES}
            title, text, caption = item_texts(cfg.seed, i, attrs, cfg.caption_mention_prob)
            item_lines.append(json.dumps({"item_id": i, "title": title, "text": text,
                                          "image": image_name(i)}) + "\n")
            cap_lines.append(json.dumps({"item_id": i, "caption": caption}) + "\n")
        atomic_write_text(out / "items.jsonl", "".join(item_lines))
        atomic_write_text(out / "captions.jsonl", "".join(cap_lines))

    splits = {name: int(np.sum(labels == j)) for j, name in enumerate(SPLIT_NAMES)}
    counts = {"items": cfg.n_items, "users": cfg.n_users, "interactions": int(len(users)), **splits}
    truth = {
        "version": 1, "seed": cfg.seed, "split_seed": split_seed, "image_size": cfg.image_size,
        "temperature": cfg.temperature, "popularity_weight": cfg.popularity_weight,
        **({} if sampler == "exact" else {"sampler": sampler}),
        "min_interactions": cfg.min_interactions, "mean_interactions": cfg.mean_interactions,
        "counts": counts, "attributes": list(ATTRIBUTES),
        "vocab": {a: list(v) for a, v in VOCAB.items()}, "synonyms": SYNONYMS,
        "colour_rgb": COLOUR_RGB.astype(int).tolist(),
        "canonical_shape": {c: SHAPES[s] for c, s in zip(CATEGORIES, CANONICAL_SHAPE)},
        "canonical_shape_prob": CANONICAL_SHAPE_PROB,
        "visibility": VISIBILITY, "caption_attributes": list(CAPTION_ATTRIBUTES),
        **({"caption_mention_prob": cfg.caption_mention_prob,
            "caption_mentions": list(CAPTION_MENTIONS)} if cfg.caption_mention_prob > 0 else {}),
        "importance": IMPORTANCE,
        "utility_variance_share": variance_share(prefs, item_attrs, np.log(pop),
                                                 cfg.popularity_weight),
        "item_attributes": {a: item_attrs[a].tolist() for a in ATTRIBUTES},
        "popularity": np.round(pop, 4).tolist(),
        "user_interaction_target": k.tolist(),
        "user_preferences": {a: np.round(prefs[a], 4).tolist() for a in ATTRIBUTES},
    }
    # the catalog owns the item index (as `ptmrec catalog`'s does): items that no user
    # happened to interact with, the last index included, are still items of every stage
    atomic_write_json(out / "catalog.json", {"items": cfg.n_items, "users": cfg.n_users,
                                             "interactions": int(len(users)),
                                             "source": "ptmrec make-data synthetic"})
    atomic_write_text(out / "truth.json", _compact_json(truth))
    return {"n_items": cfg.n_items, "n_users": cfg.n_users, "n_interactions": int(len(users)),
            "seconds": round(time.perf_counter() - t0, 3), "out_dir": str(out), "splits": splits,
            "sampler": sampler, **({"shards": str(shards)} if shards is not None else {})}

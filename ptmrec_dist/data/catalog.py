"""Item catalog: ``items.jsonl`` (``item_id``, ``title``, ``text``, ``image``) plus image files.

Structural problems (bad JSON, a missing ``item_id``, duplicate ids, an ``image`` path that leads
outside the catalog folder) are always errors naming the file and line. Bad *samples* (missing,
undecodable or too large image, empty text, an id the interactions do not know) follow
``data.on_bad_sample``: ``error`` stops at the first, ``skip`` counts them in a
:class:`SkipReport`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ptmrec_dist.errors import InputError, SkipReport
from ptmrec_dist.io import iter_jsonl

CATALOG_FILE = "items.jsonl"

# Largest image (width x height) any reader of ours decodes: 64 Mpx, 8192 x 8192 (192 MiB as
# decoded RGB). Checked from the header before a pixel is decoded, so a decompression bomb (a small
# file claiming 30000 x 30000) costs nothing; a larger image is the bad sample "image too large".
# Ours on purpose, not PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` (which warns, raises only at
# twice its value, and which any other library in the process may change or switch off).
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLarge(ValueError):
    """An image whose header gives more than :data:`MAX_IMAGE_PIXELS` pixels."""


def open_image(fp) -> Image.Image:
    """``Image.open`` (a path or a file object) with :data:`MAX_IMAGE_PIXELS` checked from the
    header, before anything is decoded; raises :class:`ImageTooLarge`. PIL's own bomb check can
    only fire first for a larger image (its limit is higher) and is reported the same way."""
    limit = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1))} pixels" if found else "too many pixels"
            raise ImageTooLarge(f"image too large ({size}; the limit is {limit})") from None
    width, height = img.size
    if width * height > limit:
        img.close()
        raise ImageTooLarge(f"image too large ({width} x {height} pixels; the limit is {limit})")
    return img


def image_path_problem(root: str, rel: str, dirs: dict[str, str] | None = None) -> str | None:
    """Why the catalog image path ``rel`` is not a file inside the catalog folder ``root`` (an
    ``os.path.realpath``), or None. Refused: absolute paths, ``..`` that climbs out, and symbolic
    links (of the file or of a folder on the way) that resolve outside. ``dirs`` caches resolved
    folders, so a million items in a few folders cost about one ``lstat`` each."""
    if os.path.isabs(rel):
        return "an absolute path; image paths are relative to the catalog folder"
    if ".." in Path(rel).parts:   # the kernel resolves a symlink before the ".." after it
        real = os.path.realpath(os.path.join(root, rel))
    else:
        parent, name = os.path.split(rel)
        real_parent = dirs.get(parent) if dirs is not None else None
        if real_parent is None:
            real_parent = os.path.realpath(os.path.join(root, parent))
            if dirs is not None:
                dirs[parent] = real_parent
        real = os.path.join(real_parent, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
    if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
        return None
    if os.path.normpath(rel).split(os.sep)[0] == "..":
        return "it climbs out with '..'"
    return f"a symbolic link on the way resolves to {real}"


@dataclass
class CatalogItem:
    item_id: str
    title: str
    text: str
    image: str            # path relative to the catalog folder ("" if absent)
    line: int
    index: int = -1       # item index in the interactions' id space, once resolved

    @property
    def encoder_text(self) -> str:
        """What the text encoder reads: ``title. text`` (either may be empty)."""
        title, text = self.title.strip(), self.text.strip()
        if title and text:
            return f"{title}. {text}"
        return title or text


def read_catalog(catalog_dir: str | Path) -> list[CatalogItem]:
    path = Path(catalog_dir) / CATALOG_FILE
    if not path.is_file():
        raise InputError(path, f"catalog file not found (a catalog folder holds {CATALOG_FILE} "
                               "and the images it names)")
    items: list[CatalogItem] = []
    seen: dict[str, int] = {}
    root, dirs = os.path.realpath(catalog_dir), {}
    for line_no, obj in iter_jsonl(path):
        if "item_id" not in obj or obj["item_id"] in (None, ""):
            raise InputError(path, "missing", line=line_no, field="item_id")
        if not isinstance(obj["item_id"], (str, int)) or isinstance(obj["item_id"], bool):
            raise InputError(path, f"must be a string or an integer, got {obj['item_id']!r}",
                             line=line_no, field="item_id")
        for key in ("title", "text", "image"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise InputError(path, f"must be a string, got {obj[key]!r}",
                                 line=line_no, field=key)
        item_id = str(obj["item_id"])
        if item_id in seen:
            raise InputError(path, f"duplicate item_id {item_id!r} (first at line "
                                   f"{seen[item_id]})", line=line_no, field="item_id")
        seen[item_id] = line_no
        why = image_path_problem(root, obj["image"], dirs) if obj.get("image") else None
        if why:
            raise InputError(path, f"{obj['image']!r} is outside the catalog folder {root}: "
                                   f"{why} (files outside the catalog folder are never read: copy "
                                   "the images in, or let `ptmrec catalog` link them in)",
                             line=line_no, field="image")
        items.append(CatalogItem(item_id=item_id, title=obj.get("title") or "",
                                 text=obj.get("text") or "", image=obj.get("image") or "",
                                 line=line_no))
    if not items:
        raise InputError(path, "the catalog has no items")
    return items


def resolve_indices(items: list[CatalogItem], item_index: np.ndarray | None, path: Path,
                    skips: SkipReport, on_bad_sample: str) -> tuple[list[CatalogItem], int]:
    """Give every item its index; returns (kept items sorted by index, size of the index space).

    ``item_index``: per item, its index from the interactions (-1: unknown id), or None when
    there are no interactions, in which case the ids themselves must be the indices 0..N-1.
    """
    if item_index is None:
        ids = [it.item_id for it in items]
        if not all(i.isdecimal() for i in ids):
            bad = next(it for it in items if not it.item_id.isdecimal())
            raise InputError(path, f"non-integer item_id {bad.item_id!r} and no interactions "
                                   "to map it (pass --interactions)", line=bad.line,
                             field="item_id")
        from ptmrec_dist.data.interactions import MAX_INDEX
        big = next((it for it in items if int(it.item_id) > MAX_INDEX), None)
        if big is not None:       # the ids are the indices: a huge one would size every table
            raise InputError(path, f"item_id {big.item_id} is above {MAX_INDEX:,}, and without "
                                   "interactions the ids are the item indices (pass "
                                   "--interactions to map raw ids)", line=big.line,
                             field="item_id")
        item_index = np.array([int(i) for i in ids], dtype=np.int64)
        n_space = int(item_index.max()) + 1
    else:
        n_space = -1
    kept = []
    by_index: dict[int, CatalogItem] = {}
    for it, idx in zip(items, item_index.tolist()):
        if idx < 0:
            if on_bad_sample == "error":
                raise InputError(path, f"item_id {it.item_id!r} is not in the interactions",
                                 line=it.line, field="item_id")
            skips.add("unknown item_id", it.item_id)
            continue
        if idx in by_index:   # e.g. "1" and "01": distinct ids, one index
            first = by_index[idx]
            raise InputError(path, f"item_id {it.item_id!r} has index {idx}, like item_id "
                                   f"{first.item_id!r} (line {first.line})", line=it.line,
                             field="item_id")
        by_index[idx] = it
        it.index = idx
        kept.append(it)
    kept.sort(key=lambda it: it.index)
    return kept, n_space


def check_text(item: CatalogItem) -> str | None:
    return None if item.encoder_text else "empty text"


def load_image_bytes(catalog_dir: Path, item: CatalogItem, image_size: int,
                     quality: int) -> tuple[bytes | None, str | None]:
    """JPEG bytes for the shard (resized so the shorter side is ``image_size`` if > 0), or a
    bad-sample reason. An RGB JPEG that needs no resize keeps its original bytes."""
    if not item.image:
        return None, "missing image"
    path = catalog_dir / item.image
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None, "missing image"
    try:
        with open_image(io.BytesIO(raw)) as img:
            img.load()
            fmt, mode = img.format, img.mode
            if image_size <= 0 and fmt == "JPEG" and mode == "RGB":
                return raw, None
            rgb = img.convert("RGB")
    except (ImageTooLarge, Image.DecompressionBombError):
        return None, "image too large"
    except MemoryError:
        raise
    except Exception:   # noqa: BLE001  Pillow's decoders raise many types on malformed files
        return None, "undecodable image"
    if image_size > 0:
        w, h = rgb.size
        scale = image_size / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), None

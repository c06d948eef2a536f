"""Item catalog: ``items.jsonl`` (``item_id``, ``title``, ``text``, ``image``) plus image files.

Structural problems (bad JSON, a missing ``item_id``, duplicate ids) are always errors naming the
file and line. Bad *samples* (missing or undecodable image, empty text, an id the interactions do
not know) follow ``data.on_bad_sample``: ``error`` stops at the first, ``skip`` counts them in a
:class:`SkipReport`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ptmrec_dist.errors import InputError, SkipReport
from ptmrec_dist.io import iter_jsonl

CATALOG_FILE = "items.jsonl"


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
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            fmt, mode = img.format, img.mode
            if image_size <= 0 and fmt == "JPEG" and mode == "RGB":
                return raw, None
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
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

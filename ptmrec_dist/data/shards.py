"""Write and verify WebDataset shards of the item catalog.

Layout: ``items-000000.tar ...`` with, per item, ``<key>.jpg``, ``<key>.txt`` (what the text
encoder reads) and ``<key>.json`` (``index``, ``item_id``, ``title``, ``text``); the key is the
zero-padded item index, items are in index order. ``manifest.json`` records counts, bytes and the
sha256 of every shard. Each shard is written under a temporary name and renamed when complete;
the manifest is written last, so a folder with a manifest is a finished one. One ``ptmrec shard``
writes into a folder at a time (``OUT/.lock``, :func:`ptmrec_dist.io.run_lock`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from ptmrec_dist import __version__
from ptmrec_dist.data import catalog
from ptmrec_dist.data.catalog import CatalogItem, check_text, load_image_bytes, read_catalog, \
    resolve_indices
from ptmrec_dist.data.interactions import find_interactions_file, load_interactions
from ptmrec_dist.errors import InputError, ShardError, SkipReport
from ptmrec_dist.io import atomic_write_json, run_lock, sha256_file
from ptmrec_dist.logs import get_logger, progress

_log = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ptmrec-shards/1"
KEY_DIGITS = 9


def shard_name(k: int) -> str:
    return f"items-{k:06d}.tar"


def item_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


@dataclass
class ShardJob:
    catalog_dir: Path
    items: list[CatalogItem]
    image_size: int
    quality: int


def _encode_items(job: ShardJob) -> list[tuple[bytes | None, str | None]]:
    out = []
    for it in job.items:
        reason = check_text(it)
        if reason:
            out.append((None, reason))
        else:
            out.append(load_image_bytes(job.catalog_dir, it, job.image_size, job.quality))
    return out


def _encode_stream(catalog_dir: Path, items: list[CatalogItem], image_size: int, quality: int,
                   workers: int):
    """``(item, jpeg bytes or None, bad-sample reason or None)`` in item order. Encoded a window
    of chunks at a time, so memory holds a few thousand images, never the whole catalog."""
    chunk = 256
    jobs = [ShardJob(catalog_dir, items[i:i + chunk], image_size, quality)
            for i in range(0, len(items), chunk)]
    window = max(1, workers) * 4
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
    try:
        for w in range(0, len(jobs), window):
            batch = jobs[w:w + window]
            results = pool.map(_encode_items, batch) if pool else map(_encode_items, batch)
            for job, part in zip(batch, results):
                for it, (jpg, reason) in zip(job.items, part):
                    yield it, jpg, reason
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _write_one(path: Path, items: list[CatalogItem], images: list[bytes]) -> dict:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        # encoder=False: we hand over bytes; mtime fixed so identical input gives identical tars
        with wds.TarWriter(f, encoder=False, mtime=0.0) as tar:
            for it, jpg in zip(items, images):
                meta = {"index": it.index, "item_id": it.item_id, "title": it.title,
                        "text": it.text}
                tar.write({"__key__": item_key(it.index), "jpg": jpg,
                           "txt": it.encoder_text.encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "n_items": len(items), "first_index": items[0].index,
            "last_index": items[-1].index, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def write_shards(catalog_dir: str | Path, out_dir: str | Path, shard_size: int = 1000,
                 image_size: int = 0, on_bad_sample: str = "error",
                 interactions: str | Path | None = None, quality: int = 95,
                 workers: int | None = None, log=None) -> dict:
    """Shard a catalog; returns the manifest. ``interactions`` (default: the one in the catalog
    folder, if any) defines the item index space; without one, ``item_id`` must be the index.
    The skipped items are reported as a warning: to this module's logger, or as
    ``log("warning: ...")`` when ``log`` is given."""
    warn = _log.warning if log is None else (lambda msg: log(f"warning: {msg}"))
    catalog_dir, out_dir = Path(catalog_dir), Path(out_dir)
    catalog_file = catalog_dir / "items.jsonl"
    items = read_catalog(catalog_dir)
    skips = SkipReport()
    inter_path = None
    if interactions is not None:
        inter_path = find_interactions_file(interactions)
    else:
        try:
            inter_path = find_interactions_file(catalog_dir)
        except InputError:
            inter_path = None
    n_space = -1
    if inter_path is not None:
        inter = load_interactions(inter_path, warn=lambda m: None, catalog=catalog_dir)
        items, _ = resolve_indices(items, inter.item_index([it.item_id for it in items]),
                                   catalog_file, skips, on_bad_sample)
        n_space = inter.n_items
    else:
        items, n_space = resolve_indices(items, None, catalog_file, skips, on_bad_sample)

    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    with run_lock(out_dir, "ptmrec shard"):   # a second run into out_dir is refused, not mixed in
        (out_dir / MANIFEST).unlink(missing_ok=True)   # the folder is unfinished until rewritten
        shards: list[dict] = []
        buf_items: list[CatalogItem] = []
        buf_images: list[bytes] = []
        n_written = 0

        def flush() -> None:
            shards.append(_write_one(out_dir / shard_name(len(shards)), buf_items, buf_images))
            buf_items.clear()
            buf_images.clear()

        for it, jpg, reason in progress(_encode_stream(catalog_dir, items, image_size, quality,
                                                       workers),
                                        total=len(items), desc="shard", unit="item"):
            if reason is None:
                buf_items.append(it)
                buf_images.append(jpg)
                n_written += 1
                if len(buf_items) == shard_size:
                    flush()
            elif on_bad_sample == "error":
                field = "text" if reason == "empty text" else "image"
                detail = f" ({it.image})" if field == "image" and it.image else ""
                if reason == "image too large":
                    detail = f" ({it.image}: more than {catalog.MAX_IMAGE_PIXELS} pixels)"
                raise InputError(catalog_file, f"{reason}{detail} for item {it.item_id!r} "
                                               "(data.on_bad_sample=skip skips such items)",
                                 line=it.line, field=field)
            else:
                skips.add(reason, it.item_id)
        if buf_items:
            flush()
        if not n_written:
            raise InputError(catalog_file, f"no usable items: {skips.message()}")
        if skips.total:
            warn(f"{catalog_file}: {skips.message()}")
        missing = n_space - n_written   # indices are unique (resolve_indices checks it)
        return finish_shards(out_dir, shards, catalog=catalog_dir, interactions=inter_path,
                             n_items=n_space, n_written=n_written, n_missing=missing,
                             image_size=image_size, shard_size=shard_size, skipped=skips)


def finish_shards(out_dir: Path, shards: list[dict], *, catalog, interactions, n_items: int,
                  n_written: int, n_missing: int, image_size: int, shard_size: int,
                  skipped: SkipReport) -> dict:
    """Remove the tars of ``out_dir`` that ``shards`` (the written entries) does not name (a
    larger earlier run's) and write the manifest, last: the folder is finished."""
    names = {s["name"] for s in shards}
    for stale in out_dir.glob("items-*.tar"):
        if stale.name not in names:
            stale.unlink()
    manifest = {
        "format": FORMAT, "created_by": f"ptmrec_dist {__version__}",
        "catalog": str(catalog), "interactions": str(interactions) if interactions else None,
        "n_items": n_items, "n_written": n_written, "n_missing": n_missing,
        "image_size": image_size, "key_digits": KEY_DIGITS, "shard_size": shard_size,
        "skipped": skipped.to_dict(), "shards": shards,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_manifest(shard_dir) -> dict:
    """The manifest of a shard folder, URL, brace list or ``pipe:`` command
    (:mod:`~ptmrec_dist.data.sources`), checked."""
    from ptmrec_dist.data.sources import manifest_json, shard_source

    source = shard_source(shard_dir)
    manifest, _ = manifest_json(source)
    path = source.manifest_location
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(path, f"unknown format {found!r} (expected {FORMAT})")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardError(path, "no list of shards", field="shards")
    for n, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        # a shard is a file of this folder: a name with a folder part, absolute or climbing
        # out with "..", would open a file elsewhere
        if not isinstance(name, str) or not name or Path(name).name != name or \
                name in (".", ".."):
            raise ShardError(path, f"entry {n}: {name!r} is not a file name in this folder "
                                   "(shards are read from the manifest's own folder only)",
                             field="shards")
    source.check_names(manifest)
    return manifest


def verify_shards(shard_dir: str | Path, manifest: dict | None = None, names=None,
                  on_bad_sample: str = "error", check_hash: bool = True) -> tuple[list[dict], SkipReport]:
    """Check existence, size and sha256 of the shards (all, or those in ``names``). Remote
    shards (URLs, ``pipe:``) are all "good" here: their size and sha256 are checked on the
    stream (:class:`~ptmrec_dist.data.sources.CheckedStream`).

    Returns the good shard entries and a report of the bad ones (``skip``), or raises
    :class:`ShardError` naming the first bad shard (``error``).
    """
    from ptmrec_dist.data.sources import shard_source

    source = shard_source(shard_dir)
    manifest = manifest or load_manifest(source)
    bad = SkipReport()
    good = []
    for entry in manifest["shards"]:
        if names is not None and entry["name"] not in names:
            continue
        if source.remote:      # checked on the stream as it is read (data/sources.py)
            good.append(entry)
            continue
        path = source.local_path(entry["name"])
        kind = detail = None
        if not path.is_file():
            kind, detail = "missing shard", "listed in manifest.json but not found"
        elif path.stat().st_size != entry["bytes"]:
            kind = "truncated shard"
            detail = f"{path.stat().st_size} bytes, manifest.json says {entry['bytes']}"
        elif check_hash and sha256_file(path) != entry["sha256"]:
            kind, detail = "corrupt shard", "sha256 does not match manifest.json"
        if kind is None:
            good.append(entry)
        elif on_bad_sample == "error":
            raise ShardError(path, f"{kind}: {detail}")
        else:
            bad.add(kind, entry["name"])
    return good, bad

"""Issue 19: every bad input explained, nothing unsafe loads.

Bad input ends in exit code 2 with one message naming the file (and line), never a bare
traceback: decompression-bomb images (case 1), catalog image paths that leave the catalog folder
(case 2), shards with an invalid ``.json`` member (case 3), extraction parts of older shards
(case 4) and two ``ptmrec shard`` runs into one folder (case 5).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptmrec_dist.cli import main
from ptmrec_dist.data import catalog as catalog_mod
from ptmrec_dist.data.build_catalog import CatalogSpec, build_catalog
from ptmrec_dist.data.catalog import CatalogItem, load_image_bytes, read_catalog
from ptmrec_dist.data.readers import ExactlyOnceItems, decode_sample
from ptmrec_dist.data.shards import MANIFEST, load_manifest, write_shards
from ptmrec_dist.errors import InputError, ShardError
from ptmrec_dist.io import atomic_write_json, run_lock, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def quiet(_msg):
    pass


def subprocess_env():
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (1-bit grey) over a few bytes of data:
    what a decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def items_of(cat: Path) -> list[dict]:
    return [json.loads(x) for x in (cat / "items.jsonl").read_text().splitlines()]


def write_items(cat: Path, items: list[dict]) -> None:
    (cat / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))


# ------------------------------------------------------------------ case 1: decompression bombs

@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000)])
def test_decompression_bomb_is_skipped_and_counted(tmp_path, make_catalog, capsys, size):
    """Case 1: a PNG whose header claims 30000 x 30000 pixels (past PIL's error limit) or
    10000 x 10000 (past its warning limit only) is counted and skipped under
    ``on_bad_sample=skip`` like any other bad image, as ``image too large``, without decoding."""
    cat = make_catalog(tmp_path, n_items=5)
    (cat / "images" / "2.png").write_bytes(png_header_only(*size))
    out = tmp_path / "s"
    assert main(["shard", str(cat), "--out", str(out), "--workers", "1",
                 "data.on_bad_sample=skip"]) == 0
    m = load_manifest(out)
    assert m["n_written"] == 4
    assert m["skipped"]["by_reason"] == {"image too large": {"count": 1, "first_ids": ["2"]}}
    err = capsys.readouterr().err
    assert "skipped 1 items: 1 image too large (first: 2)" in err
    assert "Traceback" not in err and "DecompressionBomb" not in err


def test_decompression_bomb_error_names_the_item_and_the_file(tmp_path, make_catalog, capsys):
    """Case 1: under ``on_bad_sample=error`` the bomb stops ``ptmrec shard`` with exit 2 and one
    line naming items.jsonl, the line, the item and the image file."""
    cat = make_catalog(tmp_path, n_items=5)
    (cat / "images" / "2.png").write_bytes(png_header_only(30000, 30000))
    out = tmp_path / "s"
    assert main(["shard", str(cat), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cat / 'items.jsonl'}:3: image: image too large "
                          "(images/2.png: more than 67108864 pixels) for item '2'")
    assert "Traceback" not in err
    assert not (out / MANIFEST).exists()


def test_pixel_limit_is_ours_not_pils_global(tmp_path, monkeypatch):
    """Case 1: the limit is ``catalog.MAX_IMAGE_PIXELS``, whatever PIL's global says (even
    ``None``, which turns PIL's own check off)."""
    img = tmp_path / "images" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(img)
    item = CatalogItem(item_id="a", title="t", text="", image="images/a.png", line=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image_bytes(tmp_path, item, 0, 90)[1] is None
    monkeypatch.setattr(catalog_mod, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    assert load_image_bytes(tmp_path, item, 0, 90) == (None, "image too large")
    assert catalog_mod.MAX_IMAGE_PIXELS != Image.MAX_IMAGE_PIXELS


def test_decompression_bomb_in_a_shard_member_names_shard_and_member():
    """Case 1: a bomb inside a shard (a hand-made or foreign one) is a ShardError naming the
    shard and the member, not PIL's DecompressionBombError."""
    sample = {"__url__": "/x/items-000000.tar", "__key__": "000000007",
              "jpg": png_header_only(30000, 30000), "txt": b"t",
              "json": json.dumps({"index": 7, "item_id": "7"}).encode()}
    with pytest.raises(ShardError, match=r"^/x/items-000000\.tar: member 000000007\.jpg: "
                                         r"image too large \(900000000 pixels; the limit is "
                                         r"67108864\)"):
        decode_sample(sample, "pil")
    assert decode_sample(sample, "bytes")["image"] == sample["jpg"]   # not decoded: not checked


def test_decompression_bomb_in_load_images_names_the_file(tmp_path):
    """Case 1: the demo backbone's image loader (clip/images.py) refuses a bomb by name too."""
    from ptmrec_dist.clip.images import build_image_processor, load_images
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(10000, 10000))
    with pytest.raises(InputError, match=rf"^{bomb}: image too large \(10000 x 10000 pixels"):
        load_images([bomb], build_image_processor(32), 32)


# ------------------------------------------------------------------ case 2: paths out of a catalog

def _outside_cases(tmp_path: Path, cat: Path) -> dict[str, str]:
    """Ways an items.jsonl ``image`` can name a file outside the catalog folder."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(secret)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "elsewhere" / "x.png")
    (cat / "images" / "link.png").symlink_to(secret)
    (cat / "linked").symlink_to(tmp_path / "elsewhere")
    return {"absolute": str(secret), "dotdot": "../secret.png",
            "dotdot_inside": "images/../../secret.png", "file_symlink": "images/link.png",
            "dir_symlink": "linked/x.png"}


@pytest.mark.parametrize("how", ["absolute", "dotdot", "dotdot_inside", "file_symlink",
                                 "dir_symlink"])
@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_catalog_image_outside_the_folder_is_refused(tmp_path, make_catalog, capsys, how,
                                                     on_bad_sample):
    """Case 2: an ``image`` that is absolute, climbs out with ``..`` or resolves outside through
    a symbolic link is refused (exit 2, items.jsonl:line, the path), under ``skip`` too: it is
    not a bad sample but a catalog that reads files it does not hold."""
    cat = make_catalog(tmp_path, n_items=5)
    path = _outside_cases(tmp_path, cat)[how]
    items = items_of(cat)
    items[3]["image"] = path
    write_items(cat, items)
    out = tmp_path / "s"
    assert main(["shard", str(cat), "--out", str(out), "--workers", "1",
                 f"data.on_bad_sample={on_bad_sample}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cat / 'items.jsonl'}:4: image: {path!r} ")
    assert "outside the catalog folder" in err and "Traceback" not in err
    assert not (out / MANIFEST).exists()
    with pytest.raises(InputError, match="outside the catalog folder"):
        read_catalog(cat)


def test_catalog_paths_that_stay_inside_are_read(tmp_path, make_catalog):
    """Case 2: ``..`` that stays inside, a symlink to another image of the catalog and a catalog
    folder that is itself reached through a symlink are all fine."""
    real = make_catalog(tmp_path, n_items=3)
    (real / "images" / "alias.png").symlink_to(real / "images" / "1.png")
    items = items_of(real)
    items[0]["image"] = "images/../images/0.jpg"
    items[1]["image"] = "images/alias.png"
    write_items(real, items)
    (tmp_path / "via").symlink_to(real)
    m = write_shards(tmp_path / "via", tmp_path / "s", log=quiet, workers=1)
    assert m["n_written"] == 3


def _table(tmp_path: Path, image_value: str) -> Path:
    d = tmp_path / "raw"
    (d / "posters").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "posters" / "m1.jpg")
    (d / "items.csv").write_text(f"movie_id,title,poster\nm1,A,posters/m1.jpg\n"
                                 f"m2,B,{image_value}\n")
    return d


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_catalog_builder_refuses_image_columns_outside_the_table_folder(tmp_path, capsys, how):
    """Case 2 (``ptmrec catalog``): an image column value that is absolute or climbs out of the
    item table's folder is refused, naming the table, the line, the column and the value."""
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(secret)
    value = str(secret) if how == "absolute" else "../secret.jpg"
    d = _table(tmp_path, value)
    assert main(["catalog", "--items", str(d / "items.csv"), "--title", "title",
                 "--text", "{title}", "--image-column", "poster", "--out",
                 str(tmp_path / "cat")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d / 'items.csv'}:3: poster: {value!r} ")
    assert "outside the item table's folder" in err and "Traceback" not in err
    assert not (tmp_path / "cat" / "items.jsonl").exists()


def test_catalog_builder_refuses_a_pattern_that_climbs_out(tmp_path):
    """Case 2 (``ptmrec catalog``): ``--image`` patterns are checked after the columns are
    filled in (an id ``../../x`` must not walk out of the folder)."""
    d = _table(tmp_path, "")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.jpg")
    (d / "items.csv").write_text("movie_id,title\nm1,A\n../../secret,B\n")
    with pytest.raises(InputError, match=r"items\.csv:3: --image: '.*\.\./\.\./secret\.jpg' is "
                                         r"outside the item table's folder"):
        build_catalog(CatalogSpec(items=d / "items.csv", out=tmp_path / "cat", text="{title}",
                                  image="posters/{movie_id}.jpg"), log=quiet)


def test_catalog_builder_follows_symlinks_inside_the_table_folder(tmp_path):
    """Case 2 (``ptmrec catalog``, documented): a poster folder linked into the table's folder
    is read (the user's own input); the catalog it writes holds the images itself, so
    ``ptmrec shard`` accepts it."""
    store = tmp_path / "store"
    store.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(store / "m1.jpg")
    d = tmp_path / "raw"
    d.mkdir()
    (d / "posters").symlink_to(store)
    (d / "items.csv").write_text("movie_id,title\nm1,A\n")
    summary = build_catalog(CatalogSpec(items=d / "items.csv", out=tmp_path / "cat",
                                        text="{title}", image="posters/{movie_id}.jpg"), log=quiet)
    assert summary["with_image"] == 1
    assert not (tmp_path / "cat" / "images" / "000000000.jpg").is_symlink()
    assert write_shards(tmp_path / "cat", tmp_path / "s", log=quiet, workers=1)["n_written"] == 1


# ------------------------------------------------------------------ case 3: bad .json member

def rewrite_member(shards: Path, shard: str, member: str, data: bytes) -> None:
    """Replace one member of a shard and update manifest.json (size, sha256), as a foreign or
    hand-made shard would be: it passes verification, its content is bad."""
    path = shards / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, content in members:
            if info.name == member:
                content = data
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(buf.getvalue())
    manifest = load_manifest(shards)
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    atomic_write_json(shards / MANIFEST, manifest)


@pytest.fixture
def bad_json_shards(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=8)
    out = tmp_path / "s"
    write_shards(cat, out, shard_size=4, log=quiet, workers=1)
    rewrite_member(out, "items-000001.tar", "000000005.json", b'{"index": 5, "item_id": ')
    return out


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
@pytest.mark.parametrize("decode", ["pil", "none"])
def test_invalid_json_member_is_a_shard_error(bad_json_shards, on_bad_sample, decode):
    """Case 3: an invalid ``.json`` member is a ShardError naming the shard and the member (not a
    JSONDecodeError), under ``skip`` too, as a missing member or a key that does not match its
    index is: streaming readers cannot drop a sample without unbalancing the ranks, and our
    writer never makes such a member (the shard is corrupt, not the item)."""
    ds = ExactlyOnceItems(bad_json_shards, decode=decode, on_bad_sample=on_bad_sample)
    with pytest.raises(ShardError) as exc:
        list(ds)
    msg = str(exc.value)
    assert msg.startswith(f"{bad_json_shards / 'items-000001.tar'}: member 000000005.json: "
                          "invalid JSON")
    assert "line 1 column" in msg


def test_other_bad_members_name_shard_and_member():
    """Case 3: a ``.json`` member that is not an object or lacks ``index``, and an undecodable
    image, name the shard and the member too."""
    base = {"__url__": "/x/items-000000.tar", "__key__": "000000003", "txt": b"t",
            "jpg": b"not an image"}
    with pytest.raises(ShardError, match=r"000000003\.json: expected a JSON object with "
                                         r"'index' and 'item_id'"):
        decode_sample({**base, "json": b"[1, 2]"}, "none")
    with pytest.raises(ShardError, match=r"000000003\.json: expected a JSON object"):
        decode_sample({**base, "json": b'{"index": 3}'}, "none")
    with pytest.raises(ShardError, match=r"^/x/items-000000\.tar: member 000000003\.jpg: "
                                         r"undecodable image"):
        decode_sample({**base, "json": b'{"index": 3, "item_id": "3"}'}, "pil")


# ------------------------------------------------------------------ case 4: stale extract parts

@pytest.fixture(scope="module")
def extract_world(tmp_path_factory, make_catalog):
    from clip_fixtures import save_tiny_clip
    base = tmp_path_factory.mktemp("stale")
    make_catalog(base, n_items=12)
    save_tiny_clip(base / "clip")
    return base


def _extract(world: Path, shards: Path, out: Path) -> int:
    return main(["extract", "--shards", str(shards), "--backbone", str(world / "clip"),
                 "--out", str(out), "extract.num_workers=0", "extract.feature_dtype=fp32"])


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.npz")}


def test_extract_parts_of_other_shards_are_not_reused(extract_world, tmp_path, capsys):
    """Case 4: parts record the sha256 of the shard they were made from. Rerun on the same shards:
    every part is reused. Re-shard a changed catalog into the same folder: the parts of changed
    shards are discarded with a note and recomputed, those of unchanged shards kept, and parts
    of shards that no longer exist removed; the result equals a fresh extraction."""
    import shutil
    cat = tmp_path / "catalog"
    shutil.copytree(extract_world / "catalog", cat)
    shards, out = tmp_path / "s", tmp_path / "f"
    write_shards(cat, shards, shard_size=4, log=quiet, workers=1)
    assert _extract(extract_world, shards, out) == 0
    first = _mtimes(out)
    assert sorted(first) == ["items-000000.npz", "items-000001.npz", "items-000002.npz"]
    capsys.readouterr()

    assert _extract(extract_world, shards, out) == 0           # same shards: all reused
    assert _mtimes(out) == first
    assert "resume: 3 of 3 shards of rank 0 already done" in capsys.readouterr().err

    items = items_of(cat)                                     # item 5 (shard 1) gets new text
    items[5]["text"] = "a completely different description"
    write_items(cat, items)
    write_shards(cat, shards, shard_size=4, log=quiet, workers=1)
    assert _extract(extract_world, shards, out) == 0
    second = _mtimes(out)
    assert second["items-000000.npz"] == first["items-000000.npz"]
    assert second["items-000002.npz"] == first["items-000002.npz"]
    assert second["items-000001.npz"] != first["items-000001.npz"]
    printed = capsys.readouterr().err
    assert "discarding 1 feature part made from other shards" in printed
    fresh = tmp_path / "fresh"
    assert _extract(extract_world, shards, fresh) == 0
    for name in ("image.npy", "text.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(fresh / name))
    capsys.readouterr()

    write_shards(cat, shards, shard_size=6, log=quiet, workers=1)   # 2 shards now
    assert _extract(extract_world, shards, out) == 0
    assert sorted(_mtimes(out)) == ["items-000000.npz", "items-000001.npz"]
    printed = capsys.readouterr().err
    assert "discarding 2 feature parts made from other shards" in printed
    assert "removing 1 feature part of shards no longer in" in printed
    fresh6 = tmp_path / "fresh6"
    assert _extract(extract_world, shards, fresh6) == 0
    np.testing.assert_array_equal(np.load(out / "text.npy"), np.load(fresh6 / "text.npy"))


# ------------------------------------------------------------------ case 5: one writer per folder

HOLD = ("import sys\n"
        "from ptmrec_dist.io import run_lock\n"
        "with run_lock(sys.argv[1], 'ptmrec shard'):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    """Case 5: ``run_lock`` with two processes: the second is refused with an InputError naming
    the folder, what holds it, its pid and host; released at exit (the lock file goes), and a
    holder killed with SIGKILL leaves a lock file that does not block the next run."""
    folder = tmp_path / "out"
    proc = _holder(folder)
    try:
        with pytest.raises(InputError) as exc:
            with run_lock(folder, "ptmrec shard"):
                pass
        msg = str(exc.value)
        assert msg.startswith(f"{folder}: in use by ptmrec shard (pid {proc.pid} on "
                              f"{socket.gethostname()}")
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0 and not (folder / ".lock").exists()
    with run_lock(folder, "ptmrec shard"):
        assert (folder / ".lock").is_file()
    proc = _holder(folder)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (folder / ".lock").exists()                   # stale file, no lock
    with run_lock(folder, "ptmrec shard"):
        pass
    assert not (folder / ".lock").exists()


def test_second_shard_run_into_one_folder_exits_2(tmp_path, make_catalog):
    """Case 5: ``ptmrec shard`` into a folder another run holds exits 2 naming the folder and the
    holder (pid, host), and writes nothing there."""
    cat = make_catalog(tmp_path, n_items=3)
    out = tmp_path / "s"
    proc = _holder(out)
    try:
        res = subprocess.run([sys.executable, "-m", "ptmrec_dist", "shard", str(cat), "--out",
                              str(out), "--workers", "1"], capture_output=True, text=True,
                             env=subprocess_env(), cwd=ROOT, timeout=300)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"error: {out}: in use by ptmrec shard (pid {proc.pid} on "
                                 f"{socket.gethostname()}")
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == []
    assert main(["shard", str(cat), "--out", str(out), "--workers", "1"]) == 0
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/shard-000000.tar", "sub/x.tar", "",
                                  ".."])
def test_a_manifest_cannot_point_outside_its_folder(tmp_path, name):
    """manifest.json lists its shards by file name; a name that is absolute, has a folder part
    or climbs out is a ShardError naming manifest.json, before any file is opened."""
    import json

    from ptmrec_dist.data.shards import FORMAT, load_manifest
    from ptmrec_dist.errors import ShardError

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "shards": [{"name": name, "bytes": 1, "sha256": "0", "n_items": 1}]}))
    with pytest.raises(ShardError, match="manifest.json: shards: entry 0: .* is not a file name"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("item_id", ["4000000000", "99999999999999999999"])
def test_a_huge_item_id_without_interactions_names_the_line(tmp_path, item_id):
    """Without interactions a catalog's ids are its item indices: an id above the bound (or
    beyond int64) is refused naming items.jsonl, the line and the id, before anything is
    sized by it."""
    import json

    from ptmrec_dist.data.catalog import read_catalog, resolve_indices
    from ptmrec_dist.errors import InputError, SkipReport

    lines = [{"item_id": "0", "text": "a"}, {"item_id": item_id, "text": "b"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = read_catalog(tmp_path)
    with pytest.raises(InputError, match=rf"items.jsonl:2: item_id: item_id {item_id} is above"):
        resolve_indices(items, None, tmp_path / "items.jsonl", SkipReport(), "error")

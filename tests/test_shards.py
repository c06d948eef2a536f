"""Writing and verifying item shards (``ptmrec_dist.data.shards``) and the ``shard`` subcommand."""

import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from ptmrec_dist.cli import main
from ptmrec_dist.data.readers import ExactlyOnceItems, collate_items
from ptmrec_dist.data.shards import FORMAT, MANIFEST, load_manifest, verify_shards, write_shards
from ptmrec_dist.errors import InputError, ShardError

N = 25


def quiet(_msg):
    pass


def shard(cat, out, **kw):
    kw.setdefault("log", quiet)
    kw.setdefault("workers", 1)
    return write_shards(cat, out, **kw)


def tar_members(path):
    """[(name, bytes)] in archive order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples(out, manifest):
    """{index: {"jpg": bytes, "txt": str, "json": dict}} over all shards, plus the key order."""
    found, order = {}, []
    for entry in manifest["shards"]:
        for name, data in tar_members(out / entry["name"]):
            key, ext = name.split(".", 1)
            if not order or order[-1] != key:
                order.append(key)
            found.setdefault(int(key), {})[ext] = data
    for s in found.values():
        s["txt"] = s["txt"].decode("utf-8")
        s["json"] = json.loads(s["json"])
    return found, order


def items_jsonl(cat):
    return [json.loads(line) for line in (cat / "items.jsonl").read_text().splitlines()]


def write_lines(cat, objs_or_lines):
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs_or_lines]
    (cat / "items.jsonl").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ write_shards

def test_write_shards_layout_and_manifest(tmp_path, make_catalog):
    cat = make_catalog(tmp_path)
    out = tmp_path / "shards"
    m = shard(cat, out, shard_size=9)
    assert m == load_manifest(out)
    assert m["format"] == FORMAT
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (N, N, 0)
    assert m["skipped"] == {"total": 0, "by_reason": {}}
    assert m["interactions"] is None and m["shard_size"] == 9

    names = [s["name"] for s in m["shards"]]
    assert names == ["items-000000.tar", "items-000001.tar", "items-000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [MANIFEST])   # no .tmp left
    assert [(s["n_items"], s["first_index"], s["last_index"]) for s in m["shards"]] == \
        [(9, 0, 8), (9, 9, 17), (7, 18, 24)]
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        members = [name for name, _ in tar_members(out / s["name"])]
        expected = [f"{i:09d}.{ext}" for i in range(s["first_index"], s["last_index"] + 1)
                    for ext in ("jpg", "json", "txt")]
        assert sorted(members) == sorted(expected)

    found, order = samples(out, m)
    assert order == [f"{i:09d}" for i in range(N)]          # index order across shards
    lines = items_jsonl(cat)
    for i in range(N):
        s, src = found[i], lines[i]
        assert s["json"] == {"index": i, "item_id": str(i), "title": src["title"],
                             "text": src["text"]}
        assert s["txt"] == f"{src['title']}. {src['text']}"
        with Image.open(io.BytesIO(s["jpg"])) as img, Image.open(cat / src["image"]) as orig:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == orig.size                      # image_size=0 keeps the size
            if orig.format == "JPEG" and orig.mode == "RGB":  # kept byte for byte
                assert s["jpg"] == (cat / src["image"]).read_bytes()


def test_encoder_text_with_only_title_or_text(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=3)
    lines = items_jsonl(cat)
    lines[0]["text"] = ""
    lines[1]["title"] = "  "
    write_lines(cat, lines)
    found, _ = samples(tmp_path / "s", shard(cat, tmp_path / "s"))
    assert found[0]["txt"] == "Item 0"
    assert found[1]["txt"] == lines[1]["text"]


def test_image_resize_keeps_aspect(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=10)
    m = shard(cat, tmp_path / "s", image_size=16)
    assert m["image_size"] == 16
    found, _ = samples(tmp_path / "s", m)
    sizes = set()
    for i, src in enumerate(items_jsonl(cat)):
        with Image.open(cat / src["image"]) as orig:
            w, h = orig.size
        with Image.open(io.BytesIO(found[i]["jpg"])) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert min(img.size) == 16
            assert img.size == (round(w * 16 / min(w, h)), round(h * 16 / min(w, h)))
            assert abs(img.size[0] / img.size[1] - w / h) < 0.1
            sizes.add(img.size)
    assert len(sizes) >= 3          # the catalog really has landscape, portrait and square images


def test_rerun_is_byte_identical(tmp_path, make_catalog):
    cat = make_catalog(tmp_path)
    out = tmp_path / "s"
    m1 = shard(cat, out, shard_size=7, image_size=16)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    m2 = shard(cat, out, shard_size=7, image_size=16)
    assert m1 == m2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # another folder: same shard bytes
    m3 = shard(cat, tmp_path / "t", shard_size=7, image_size=16)
    assert [s["sha256"] for s in m3["shards"]] == [s["sha256"] for s in m1["shards"]]


def test_parallel_encoding_gives_the_same_shards(tmp_path, make_catalog):
    """More than one 256-item chunk: the process pool encodes; the result must not change."""
    cat = make_catalog(tmp_path, n_items=300, missing_image=(7, 280))
    serial = shard(cat, tmp_path / "a", shard_size=100, image_size=16, on_bad_sample="skip")
    pooled = shard(cat, tmp_path / "b", shard_size=100, image_size=16, on_bad_sample="skip",
                   workers=2)
    assert pooled["n_written"] == 298
    assert pooled["skipped"] == serial["skipped"]
    assert pooled["skipped"]["by_reason"]["missing image"]["first_ids"] == ["7", "280"]
    assert [s["sha256"] for s in pooled["shards"]] == [s["sha256"] for s in serial["shards"]]


def test_stale_shards_of_a_previous_run_are_removed(tmp_path, make_catalog):
    cat = make_catalog(tmp_path)
    out = tmp_path / "s"
    assert len(shard(cat, out, shard_size=5)["shards"]) == 5
    m = shard(cat, out, shard_size=9)
    assert sorted(p.name for p in out.iterdir()) == \
        ["items-000000.tar", "items-000001.tar", "items-000002.tar", MANIFEST]
    verify_shards(out)
    found, _ = samples(out, m)
    assert sorted(found) == list(range(N))


def test_inter_interactions_define_the_index_space(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, interactions="inter")
    m = shard(cat, tmp_path / "s", shard_size=10)
    assert m["interactions"].endswith("interactions.inter")
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (N, N, 0)


def test_raw_id_csv_maps_to_sorted_unique_indices(tmp_path, make_catalog, raw_item_id):
    cat = make_catalog(tmp_path, interactions="csv")
    m = shard(cat, tmp_path / "s", shard_size=10)
    assert m["interactions"].endswith("interactions.csv")
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (N, N, 0)
    raw = [raw_item_id(i) for i in range(N)]
    expected = {rid: k for k, rid in enumerate(sorted(set(raw)))}
    assert expected["sku10"] == 2 and expected["sku2"] == 12       # lexicographic, not numeric
    found, order = samples(tmp_path / "s", m)
    assert order == [f"{k:09d}" for k in range(N)]
    lines = {o["item_id"]: o for o in items_jsonl(cat)}
    for k, s in found.items():
        assert s["json"]["index"] == k
        assert expected[s["json"]["item_id"]] == k
        assert s["json"]["title"] == lines[s["json"]["item_id"]]["title"]


def test_explicit_interactions_argument(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, interactions="csv")
    moved = tmp_path / "elsewhere.csv"
    (cat / "interactions.csv").rename(moved)
    with pytest.raises(InputError, match=r"items\.jsonl:1: item_id: non-integer item_id 'sku0'"):
        shard(cat, tmp_path / "s")
    m = shard(cat, tmp_path / "s", interactions=moved)
    assert m["interactions"] == str(moved) and m["n_written"] == N


# ------------------------------------------------------------------------------ bad samples

@pytest.mark.parametrize("opt, field, reason", [
    ("missing_image", "image", "missing image"),
    ("garbage_image", "image", "undecodable image"),
    ("empty_text", "text", "empty text"),
])
def test_bad_sample_error_names_line_and_field(tmp_path, make_catalog, opt, field, reason):
    cat = make_catalog(tmp_path, **{opt: (6,)})
    out = tmp_path / "s"
    with pytest.raises(InputError) as exc:
        shard(cat, out)
    msg = str(exc.value)
    assert f"items.jsonl:7: {field}: {reason}" in msg
    assert "'6'" in msg and "on_bad_sample=skip" in msg
    assert (exc.value.line, exc.value.field) == (7, field)
    assert not (out / MANIFEST).exists()


def test_bad_samples_skipped_are_counted(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, missing_image=(2, 11, 12, 13, 14, 15, 16), garbage_image=(5,),
                       empty_text=(7,))
    logged = []
    m = shard(cat, tmp_path / "s", shard_size=8, on_bad_sample="skip", log=logged.append)
    assert m["skipped"] == {"total": 9, "by_reason": {
        "missing image": {"count": 7, "first_ids": ["2", "11", "12", "13", "14"]},
        "undecodable image": {"count": 1, "first_ids": ["5"]},
        "empty text": {"count": 1, "first_ids": ["7"]}}}
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (N, N - 9, 9)
    assert sum(s["n_items"] for s in m["shards"]) == N - 9
    assert len(logged) == 1 and "skipped 9 items" in logged[0] and "missing image" in logged[0]
    found, _ = samples(tmp_path / "s", m)
    assert sorted(found) == [i for i in range(N) if i not in (2, 5, 7, 11, 12, 13, 14, 15, 16)]


def test_all_items_bad_is_an_error_even_with_skip(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=3, missing_image=(0, 1, 2))
    with pytest.raises(InputError, match="no usable items: skipped 3 items: 3 missing image"):
        shard(cat, tmp_path / "s", on_bad_sample="skip")


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
@pytest.mark.parametrize("case, line, pattern", [
    ("invalid_json", 5, r"items\.jsonl:5: invalid JSON"),
    ("not_object", 5, r"items\.jsonl:5: expected a JSON object"),
    ("missing_id", 6, r"items\.jsonl:6: item_id: missing"),
    ("empty_id", 6, r"items\.jsonl:6: item_id: missing"),
    ("bad_id_type", 6, r"items\.jsonl:6: item_id: must be a string or an integer"),
    ("bad_title_type", 6, r"items\.jsonl:6: title: must be a string"),
    ("duplicate", 26, r"items\.jsonl:26: item_id: duplicate item_id '3' \(first at line 4\)"),
    ("same_index", 26, r"items\.jsonl:26: item_id: item_id '03' has index 3, like item_id '3'"),
    ("non_integer", 26, r"items\.jsonl:26: item_id: non-integer item_id 'abc'"),
])
def test_catalog_structural_errors(tmp_path, make_catalog, case, line, pattern, on_bad_sample):
    cat = make_catalog(tmp_path)
    lines = [json.dumps(o) for o in items_jsonl(cat)]
    extra = {"title": "t", "text": "x", "image": "images/0.jpg"}
    if case == "invalid_json":
        lines[4] = lines[4][:-3]
    elif case == "not_object":
        lines[4] = "[1, 2]"
    elif case == "missing_id":
        lines[5] = json.dumps(extra)
    elif case == "empty_id":
        lines[5] = json.dumps({"item_id": "", **extra})
    elif case == "bad_id_type":
        lines[5] = json.dumps({"item_id": 5.5, **extra})
    elif case == "bad_title_type":
        lines[5] = json.dumps({"item_id": 5, **extra, "title": ["a"]})
    elif case == "duplicate":
        lines.append(json.dumps({"item_id": 3, **extra}))
    elif case == "same_index":
        lines.append(json.dumps({"item_id": "03", **extra}))
    elif case == "non_integer":
        lines.append(json.dumps({"item_id": "abc", **extra}))
    write_lines(cat, lines)
    with pytest.raises(InputError, match=pattern) as exc:
        shard(cat, tmp_path / "s", on_bad_sample=on_bad_sample)
    assert exc.value.line == line
    assert exc.value.path == str(cat / "items.jsonl")


def test_blank_lines_are_ignored_and_line_numbers_stay_true(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=4, missing_image=(3,))
    lines = [json.dumps(o) for o in items_jsonl(cat)]
    write_lines(cat, [lines[0], "", "   ", *lines[1:]])
    with pytest.raises(InputError, match=r"items\.jsonl:6: image: missing image"):
        shard(cat, tmp_path / "s")


def test_missing_catalog_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"items\.jsonl: catalog file not found"):
        shard(tmp_path / "empty", tmp_path / "s")


def test_item_not_in_interactions_error_or_skip(tmp_path, make_catalog, raw_item_id):
    cat = make_catalog(tmp_path, interactions="csv", unknown=(3, 8))
    with pytest.raises(InputError, match=r"items\.jsonl:4: item_id: item_id 'sku3' is not in the "
                                         r"interactions"):
        shard(cat, tmp_path / "s")
    logged = []
    m = shard(cat, tmp_path / "s", on_bad_sample="skip", log=logged.append)
    assert m["skipped"] == {"total": 2, "by_reason": {
        "unknown item_id": {"count": 2, "first_ids": ["sku3", "sku8"]}}}
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (N - 2, N - 2, 0)
    assert logged and "unknown item_id" in logged[0]
    found, _ = samples(tmp_path / "s", m)
    assert {s["json"]["item_id"] for s in found.values()} == \
        {raw_item_id(i) for i in range(N) if i not in (3, 8)}


def test_item_beyond_inter_index_space(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=10, interactions="inter", unknown=(9,))
    with pytest.raises(InputError, match=r"items\.jsonl:10: item_id: item_id '9' is not in"):
        shard(cat, tmp_path / "s")
    m = shard(cat, tmp_path / "s", on_bad_sample="skip")
    assert (m["n_items"], m["n_written"]) == (9, 9)
    assert m["skipped"]["by_reason"] == {"unknown item_id": {"count": 1, "first_ids": ["9"]}}


def test_index_space_gap_counts_as_missing(tmp_path, make_catalog):
    cat = make_catalog(tmp_path, n_items=10, interactions="inter")
    write_lines(cat, [o for o in items_jsonl(cat) if o["item_id"] not in (2, 4)])
    m = shard(cat, tmp_path / "s")
    assert (m["n_items"], m["n_written"], m["n_missing"]) == (10, 8, 2)
    assert m["skipped"]["total"] == 0


# ------------------------------------------------------------------------------ verify_shards

@pytest.fixture
def shard_dir(tmp_path, make_catalog):
    cat = make_catalog(tmp_path)
    out = tmp_path / "s"
    shard(cat, out, shard_size=9)
    return out


def damage(out, kind, k):
    path = out / f"items-{k:06d}.tar"
    if kind == "truncated shard":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "corrupt shard":
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return path


def test_verify_clean_shards(shard_dir):
    good, bad = verify_shards(shard_dir)
    assert [e["name"] for e in good] == [f"items-{k:06d}.tar" for k in range(3)]
    assert bad.total == 0
    good, _ = verify_shards(shard_dir, names={"items-000001.tar"})
    assert [e["name"] for e in good] == ["items-000001.tar"]


@pytest.mark.parametrize("kind, detail", [
    ("truncated shard", "bytes, manifest.json says"),
    ("corrupt shard", "sha256 does not match manifest.json"),
    ("missing shard", "listed in manifest.json but not found"),
])
def test_verify_names_the_bad_shard(shard_dir, kind, detail):
    path = damage(shard_dir, kind, 1)
    with pytest.raises(ShardError) as exc:
        verify_shards(shard_dir)
    assert str(exc.value).startswith(f"{path}: {kind}: ")
    assert detail in str(exc.value)
    good, bad = verify_shards(shard_dir, on_bad_sample="skip")
    assert [e["name"] for e in good] == ["items-000000.tar", "items-000002.tar"]
    assert bad.to_dict() == {"total": 1,
                             "by_reason": {kind: {"count": 1, "first_ids": [path.name]}}}
    if kind == "corrupt shard":       # same size: only the hash sees it
        assert len(verify_shards(shard_dir, check_hash=False)[0]) == 3


def test_verify_skip_reports_every_bad_shard(tmp_path, make_catalog):
    cat = make_catalog(tmp_path)
    out = tmp_path / "s"
    shard(cat, out, shard_size=5)
    damage(out, "missing shard", 0)
    damage(out, "corrupt shard", 2)
    damage(out, "truncated shard", 3)
    with pytest.raises(ShardError, match="items-000000.tar: missing shard"):
        verify_shards(out)
    good, bad = verify_shards(out, on_bad_sample="skip")
    assert [e["name"] for e in good] == ["items-000001.tar", "items-000004.tar"]
    assert bad.counts == {"missing shard": 1, "corrupt shard": 1, "truncated shard": 1}
    assert "skipped 3 shards" in bad.message("shards")
    # the exactly-once reader: error at construction, or reads the good shards and says so
    with pytest.raises(ShardError, match="items-000000.tar: missing shard"):
        ExactlyOnceItems(out, decode="none")
    ds = ExactlyOnceItems(out, decode="none", on_bad_sample="skip")
    assert sorted(s["index"] for s in ds) == list(range(5, 10)) + list(range(20, 25))
    assert ds.skipped.total == 3


def test_load_manifest_errors(tmp_path, shard_dir):
    with pytest.raises(ShardError, match="no manifest.json"):
        load_manifest(tmp_path)
    (shard_dir / MANIFEST).write_text("{")
    with pytest.raises(ShardError, match="manifest.json:1: invalid JSON"):
        load_manifest(shard_dir)
    (shard_dir / MANIFEST).write_text('{"format": "other/9"}')
    with pytest.raises(ShardError, match="unknown format 'other/9'"):
        load_manifest(shard_dir)


def member_offset(path, name):
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset


@pytest.mark.parametrize("cut", ["half", "member_boundary", "mid_sample"])
def test_reading_truncated_shard_without_verify_names_it(shard_dir, cut):
    """A tar cut in a member fails in tarfile; cut between samples it reads as a shorter valid
    tar, which the reader must still report (the manifest knows the count)."""
    path = shard_dir / "items-000001.tar"
    data = path.read_bytes()
    if cut == "half":
        end = len(data) // 2
    elif cut == "member_boundary":         # samples 9..11 complete, 12.. gone
        end = member_offset(path, "000000012.jpg")
    else:                                  # sample 12 lacks its .txt
        end = member_offset(path, "000000012.txt")
    path.write_bytes(data[:end])
    ds = ExactlyOnceItems(shard_dir, decode="none", verify=False)
    with pytest.raises(ShardError) as exc:
        list(ds)
    assert str(exc.value).startswith(str(path))
    loader = __import__("torch").utils.data.DataLoader(ds, batch_size=4, num_workers=0,
                                                        collate_fn=collate_items)
    with pytest.raises(ShardError, match="items-000001.tar"):
        list(loader)


def test_reading_truncated_shard_skip_reads_the_rest(shard_dir, capsys):
    path = shard_dir / "items-000001.tar"
    path.write_bytes(path.read_bytes()[:member_offset(path, "000000012.jpg")])
    ds = ExactlyOnceItems(shard_dir, decode="none", verify=False, on_bad_sample="skip")
    assert sorted(s["index"] for s in ds) == list(range(0, 12)) + list(range(18, 25))
    assert "items-000001.tar: truncated shard, 3 of 9 items read" in capsys.readouterr().err


# ------------------------------------------------------------------------------ CLI

def test_cli_shard(tmp_path, make_catalog, capsys):
    cat = make_catalog(tmp_path)
    out = tmp_path / "s"
    assert main(["shard", str(cat), "--out", str(out), "--shard-size", "7", "--workers", "1"]) == 0
    assert (out / "config.yaml").is_file()
    assert "shard_size: 7" in (out / "config.yaml").read_text()
    m = load_manifest(out)
    assert m["n_written"] == N and len(m["shards"]) == 4
    assert "wrote 25 items in 4 shards" in capsys.readouterr().out
    verify_shards(out)


def test_cli_shard_image_size_and_skip_override(tmp_path, make_catalog, capsys):
    cat = make_catalog(tmp_path, missing_image=(1,))
    out = tmp_path / "s"
    assert main(["shard", str(cat), "data.on_bad_sample=skip", "--out", str(out),
                 "--image-size", "16"]) == 0
    m = load_manifest(out)
    assert m["image_size"] == 16 and m["n_written"] == N - 1
    captured = capsys.readouterr()
    assert "skipped 1" in captured.out
    assert "missing image" in captured.err


def test_cli_shard_bad_catalog_exits_2(tmp_path, make_catalog, capsys):
    cat = make_catalog(tmp_path, garbage_image=(4,))
    out = tmp_path / "s"
    assert main(["shard", str(cat), "--out", str(out), "--shard-size", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert f"{cat / 'items.jsonl'}:5: image: undecodable image" in err
    assert "Traceback" not in err
    assert not (out / MANIFEST).exists()


def test_cli_shard_bad_config_value_exits_2(tmp_path, make_catalog, capsys):
    cat = make_catalog(tmp_path, n_items=3)
    assert main(["shard", str(cat), "--out", str(tmp_path / "s"), "--shard-size", "0"]) == 2
    assert "data.shard_size" in capsys.readouterr().err

"""Shards from wherever a cluster keeps them (data/sources.py): a folder, an http(s) URL (a local
server on 127.0.0.1 here, which can drop a connection mid-shard or serve corrupt bytes), brace
lists and ``pipe:`` commands; sizes and sha256 checked on the stream."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from ptmrec_dist.cli import main
from ptmrec_dist.data import sources
from ptmrec_dist.data.readers import ExactlyOnceItems, StreamingItems
from ptmrec_dist.data.shards import load_manifest, write_shards
from ptmrec_dist.errors import ShardError

N_ITEMS, SHARD = 12, 4          # three shards


class Server:
    """A static file server for one folder. ``drop``: shard name -> how many GETs of it are
    cut after half the bytes (the connection closed); ``ranges``: honour ``Range``;
    ``corrupt``: names served with one byte flipped (same size)."""

    def __init__(self, root: Path):
        self.root, self.drop, self.corrupt, self.ranges = root, {}, set(), True
        self.gets: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rel = self.path.lstrip("/")
                path = server.root / rel
                server.gets.append((rel, self.headers.get("Range")))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if path.name in server.corrupt:
                    data = data[:600] + bytes([data[600] ^ 0xFF]) + data[601:]
                start = 0
                rng = self.headers.get("Range")
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drop.get(path.name, 0) > 0:
                    server.drop[path.name] -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_catalog):
    root = tmp_path_factory.mktemp("sources")
    cat = make_catalog(root, n_items=N_ITEMS)
    write_shards(cat, root / "www" / "shards", shard_size=SHARD, log=lambda _m: None, workers=1)
    return root / "www" / "shards"


@pytest.fixture
def server(shards, monkeypatch):
    monkeypatch.setattr(sources, "HTTP_BACKOFF_S", 0.0)
    srv = Server(shards.parent)
    yield srv
    srv.close()


def items(spec, **kw) -> list[tuple]:
    reader = ExactlyOnceItems(spec, decode="bytes", **kw)
    return sorted((d["index"], d["item_id"], d["text"], d["image"]) for d in reader)


def names(shards) -> list[str]:
    return [e["name"] for e in load_manifest(shards)["shards"]]


def test_every_kind_of_source_reads_the_same_items(shards, server):
    want = items(shards)
    assert len(want) == N_ITEMS and len(names(shards)) == 3
    brace = "items-{000000..000002}.tar"
    for spec in (f"{server.url}/shards", f"{server.url}/shards/", f"{server.url}/shards/{brace}",
                 str(shards / brace), f"pipe:cat {shards}/{brace}", f"pipe:cat {shards}/{{name}}",
                 f"pipe:curl -s -f {server.url}/shards/{brace}"):
        if spec.startswith("pipe:curl") and shutil.which("curl") is None:
            continue
        assert items(spec) == want, spec
    # the manifest is fetched from the same place; the streaming reader reads it too
    assert load_manifest(f"{server.url}/shards") == load_manifest(shards)
    reader = StreamingItems(f"{server.url}/shards", decode="none", seed=3)
    assert sorted(d["index"] for d in reader) == sorted(range(N_ITEMS))
    # in dataloader worker processes (which rebuild errors from their messages) too
    from torch.utils.data import DataLoader

    for spec in (f"{server.url}/shards", f"pipe:cat {shards}/{brace}"):
        loader = DataLoader(ExactlyOnceItems(spec, num_workers=2, decode="none"),
                            batch_size=None, num_workers=2)
        assert sorted(d["index"] for d in loader) == list(range(N_ITEMS))


def test_a_list_must_name_exactly_the_manifests_shards(shards):
    with pytest.raises(ShardError, match=r"1 of its shards left out \(items-000002.tar\)"):
        load_manifest(str(shards / "items-{000000..000001}.tar"))
    with pytest.raises(ShardError, match="not in its manifest.json"):
        load_manifest(str(shards / "items-{000000..000003}.tar"))
    with pytest.raises(ShardError, match="spans 2 folders"):
        load_manifest(f"{{{shards},/elsewhere}}/items-000000.tar")


def test_missing_manifest_and_failing_command_name_the_place(shards, server, tmp_path):
    with pytest.raises(ShardError, match=r"/nowhere/manifest.json: not found \(HTTP 404\)"):
        load_manifest(f"{server.url}/nowhere")
    with pytest.raises(ShardError, match="command exited with 1"):
        load_manifest(f"pipe:cat {tmp_path}/{{name}}")
    with pytest.raises(ShardError, match="names one .tar"):
        load_manifest("pipe:echo hello")


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_a_dropped_connection_mid_shard_is_resumed(shards, server, ranges, capfd):
    server.ranges = ranges
    server.drop["items-000001.tar"] = 2          # cut twice, then served
    assert items(f"{server.url}/shards") == items(shards)
    retries = [x for x in capfd.readouterr().err.splitlines() if "connection lost" in x]
    assert len(retries) == 2 and all("items-000001.tar" in x for x in retries)
    gets = [rng for name, rng in server.gets if name == "shards/items-000001.tar"]
    assert len(gets) == 3 and gets[0] is None
    assert all(rng and rng.startswith("bytes=") and rng != "bytes=0-" for rng in gets[1:])


def test_a_connection_that_keeps_dropping_is_an_error_naming_the_shard(shards, server):
    server.drop["items-000002.tar"] = 100
    with pytest.raises(ShardError, match=r"items-000002.tar: connection lost at byte \d+ after "
                                         r"5 retries"):
        items(f"{server.url}/shards")


def test_corrupt_bytes_on_the_stream_stop_before_the_shards_last_item(shards, server):
    server.corrupt.add("items-000001.tar")
    reader = ExactlyOnceItems(f"{server.url}/shards", decode="none", on_bad_sample="skip")
    seen = []
    with pytest.raises(ShardError, match="items-000001.tar: corrupt shard: sha256"):
        for d in reader:
            seen.append(d["index"])
    # shard 0 whole, shard 1 without its last item: nobody saw a bad shard to its end
    assert seen[:SHARD] == list(range(SHARD)) and len(seen) < 2 * SHARD


def test_verify_reads_a_remote_source_in_full(shards, server, capsys):
    assert main(["verify", f"{server.url}/shards"]) == 0
    assert f"ok: 3 shards, {N_ITEMS} items" in capsys.readouterr().out
    server.corrupt.add("items-000000.tar")
    assert main(["verify", f"{server.url}/shards"]) == 2
    assert "items-000000.tar: corrupt shard" in capsys.readouterr().err


def test_pipe_template_quotes_names_from_the_manifest(tmp_path):
    src = sources.ShardSource("pipe:cat /data/{name}")
    assert src.location("a b;rm x.tar") == "cat /data/'a b;rm x.tar'"
    assert src.manifest_location == "cat /data/manifest.json"


def test_extract_from_a_url_gives_the_local_features(demo, server, tmp_path):
    """The demo's shards served over http: `ptmrec extract --shards URL` gives the features of
    the local folder bit for bit, and records the same manifest sha256."""
    out, _ = demo
    www = tmp_path / "www"
    shutil.copytree(out / "shards", www / "demo")
    server.root = www
    cfg = out / "stage1" / "config.yaml"
    for name, spec in (("local", www / "demo"), ("url", f"{server.url}/demo")):
        assert main(["extract", "--config", str(cfg), "--shards", str(spec), "--out",
                     str(tmp_path / name), "extract.num_workers=0"]) == 0
    for m in ("image", "text", "present"):
        assert np.array_equal(np.load(tmp_path / "local" / f"{m}.npy"),
                              np.load(tmp_path / "url" / f"{m}.npy"))
    a, b = (json.loads((tmp_path / n / "meta.json").read_text()) for n in ("local", "url"))
    assert a["manifest_sha256"] == b["manifest_sha256"] and b["shards"].startswith("http://")

"""Where shards are read from (``data.shards``, ``--shards``): what WebDataset and open_clip users
pass, resolved to one :class:`ShardSource` that reads ``manifest.json`` and opens each shard.

* a **folder** (``data/shards``): ``manifest.json`` and the tars in it (as ``ptmrec shard``
  writes them); sizes and sha256 are checked before reading (:func:`~.shards.verify_shards`);
* a **brace list** of tars, local or remote (``/data/shards/items-{000000..000009}.tar``,
  ``https://host/shards/items-{000000..000009}.tar``): ``manifest.json`` is read from the
  tars' folder, and the list must name every shard the manifest lists (the catalog owns the
  item index: a subset would leave items without features), no other;
* an **http(s) URL** of a folder (``https://host/shards``): ``URL/manifest.json``, ``URL/<name>``;
* a **pipe:** command (``pipe:curl -s https://host/shards/items-{000000..000009}.tar``, or a
  template with ``{name}``: ``pipe:aws s3 cp s3://bucket/shards/{name} -``): each shard is the
  command's standard output; ``manifest.json`` is the output of the same command with the
  shard's file name replaced by ``manifest.json``. A command that exits non-zero is an error
  naming it and the end of its standard error.

Remote shards (URLs, pipes) cannot be checked before they are read without reading them twice:
their bytes are counted and hashed **on the stream**, and a shard whose size or sha256 differs
from the manifest's is a :class:`~ptmrec_dist.errors.ShardError` naming it before the reader
hands out its last item (:func:`~.readers.iter_shard`), so no consumer finishes a bad shard. An
http connection that drops mid-shard is resumed (``Range`` request; a server without range
support sends the shard again and the bytes already read are skipped), up to
:data:`HTTP_RETRIES` times with a back-off, each retry logged.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import re
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ptmrec_dist.errors import ShardError
from ptmrec_dist.logs import get_logger

MANIFEST = "manifest.json"
HTTP_RETRIES = 5             # reconnects per shard after a dropped connection
HTTP_TIMEOUT_S = 60.0        # per socket operation
HTTP_BACKOFF_S = 0.5         # first wait before a reconnect; doubles each retry
_log = get_logger(__name__)
_URL = re.compile(r"^https?://", re.I)


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(spec))


def _is_tar(location: str) -> bool:
    return location.rstrip("/").endswith(".tar")


class ShardSource:
    """One place shards are read from. ``kind``: ``local``, ``http`` or ``pipe``; ``where``
    names it in messages; ``names``: the shards a brace list named (None: the manifest's)."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        self.names: list[str] | None = None
        self._locations: dict[str, str] = {}
        if self.spec.startswith("pipe:"):
            self.kind = "pipe"
            self._init_pipe(self.spec[len("pipe:"):].strip())
        elif _URL.match(self.spec):
            self.kind = "http"
            self._init_listed(self.spec)
        else:
            self.kind = "local"
            if "{" in self.spec and _is_tar(self.spec):
                self._init_listed(self.spec)
            else:
                self.folder = Path(self.spec)
                self.where = str(self.folder)

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    # ------------------------------------------------------------------ set-up
    def _join(self, base: str, name: str) -> str:
        return f"{base}/{name}" if self.kind == "http" else str(Path(base) / name)

    def _init_listed(self, spec: str) -> None:
        """A folder URL, or a (brace) list of tars in one folder."""
        if not _is_tar(spec) and "{" not in spec:
            base = spec.rstrip("/")
            self.where = base
            self._manifest_at = self._join(base, MANIFEST)
            if self.kind == "local":
                self.folder = Path(base)
            return
        locations = _expand(spec)
        bases = {loc.rsplit("/", 1)[0] for loc in locations}
        if len(bases) != 1:
            raise ShardError(spec, f"the shard list spans {len(bases)} folders; one folder "
                                   "holds the shards and their manifest.json")
        base = bases.pop()
        self.where = spec
        self._manifest_at = self._join(base, MANIFEST)
        self.names = [loc.rsplit("/", 1)[1] for loc in locations]
        self._locations = dict(zip(self.names, locations))
        if self.kind == "local":
            self.folder = Path(base)

    def _init_pipe(self, command: str) -> None:
        if not command:
            raise ShardError(self.spec, "empty pipe: command")
        self.where = self.spec
        if "{name}" in command:
            self._template = command
            self._manifest_at = command.replace("{name}", MANIFEST)
            return
        self._template = None
        commands = _expand(command)
        names = []
        for cmd in commands:
            tars = [tok for tok in shlex.split(cmd) if _is_tar(tok)]
            if len(tars) != 1:
                raise ShardError(self.spec, f"cannot tell which shard {cmd!r} reads: a pipe: "
                                            "command names one .tar (or use {name})")
            names.append(tars[0].rsplit("/", 1)[-1])
        self.names = names
        self._locations = dict(zip(names, commands))
        first_tar = [t for t in shlex.split(commands[0]) if _is_tar(t)][0]
        self._manifest_at = commands[0].replace(
            first_tar, first_tar[:len(first_tar) - len(names[0])] + MANIFEST)

    # ------------------------------------------------------------------ reading
    def location(self, name: str) -> str:
        """The path, URL or command of shard ``name`` (what messages name)."""
        if name in self._locations:
            return self._locations[name]
        if self.kind == "pipe":     # a name from a (remote) manifest never reaches the shell
            return self._template.replace("{name}", shlex.quote(name))
        if self.kind == "http":
            return self._join(self.where, urllib.parse.quote(name))
        return str(self.folder / name)

    def local_path(self, name: str) -> Path | None:
        return Path(self.location(name)) if self.kind == "local" else None

    @property
    def manifest_location(self) -> str:
        if self.kind == "local":
            return str(self.folder / MANIFEST)
        return self._manifest_at

    def read_manifest_bytes(self) -> bytes:
        """``manifest.json``'s bytes; a missing one is a ShardError naming where it was looked
        for."""
        where = self.manifest_location
        if self.kind == "local":
            path = Path(where)
            if not path.is_file():
                raise ShardError(path, "no manifest.json: not a finished shard folder "
                                       "(run `ptmrec shard`)")
            return path.read_bytes()
        with self.open_raw(where) as stream:
            data = stream.read()
        return data

    def check_names(self, manifest: dict) -> None:
        """A brace list must name exactly the manifest's shards."""
        if self.names is None:
            return
        listed = [e["name"] for e in manifest["shards"]]
        extra = [n for n in self.names if n not in set(listed)]
        missing = [n for n in listed if n not in set(self.names)]
        if extra or missing:
            parts = []
            if extra:
                parts.append(f"{len(extra)} not in its manifest.json ({', '.join(extra[:3])})")
            if missing:
                parts.append(f"{len(missing)} of its shards left out "
                             f"({', '.join(missing[:3])}): the catalog owns the item index, "
                             "every shard is needed")
            raise ShardError(self.where, "the shard list names " + "; ".join(parts))

    def open_raw(self, location: str):
        """A readable binary stream of ``location`` (path, URL or command)."""
        if self.kind == "local":
            return open(location, "rb")
        if self.kind == "http":
            return HttpStream(location)
        return PipeStream(location)

    def open_checked(self, entry: dict) -> "CheckedStream":
        """Shard ``entry``'s bytes, counted and hashed as they are read."""
        where = self.location(entry["name"])
        return CheckedStream(self.open_raw(where), where, entry)

    def reader_args(self, entry: dict) -> tuple:
        """``(where, opener)`` for :func:`~ptmrec_dist.data.readers.iter_shard`: a local
        shard's path (checked before reading) or a remote one's name and checked opener."""
        if not self.remote:
            return self.local_path(entry["name"]), None
        return self.location(entry["name"]), functools.partial(self.open_checked, entry)


def shard_source(spec: str | Path | ShardSource) -> ShardSource:
    return spec if isinstance(spec, ShardSource) else ShardSource(spec)


def is_local_folder(spec) -> bool:
    """A plain folder (not a URL, pipe or brace list): what ``tune`` may resolve as a path."""
    s = str(spec)
    return not (s.startswith("pipe:") or _URL.match(s) or ("{" in s and _is_tar(s)))


# ---------------------------------------------------------------------- streams

class _Stream:
    """A readable binary stream closed by ``with`` (each kind defines ``read`` and ``close``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckedStream(_Stream):
    """Counts and hashes what is read; :meth:`finish` reads the rest and compares size and
    sha256 with the manifest entry (a ShardError naming the shard when they differ)."""

    def __init__(self, raw, where: str, entry: dict):
        self.raw, self.where, self.entry = raw, where, entry
        self.hash, self.n = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        self.n += len(data)
        return data

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        if self.n != self.entry["bytes"]:
            raise ShardError(self.where, f"truncated shard: {self.n} bytes read, manifest.json "
                                         f"says {self.entry['bytes']}")
        if self.hash.hexdigest() != self.entry["sha256"]:
            raise ShardError(self.where, "corrupt shard: sha256 of the bytes read does not "
                                         "match manifest.json")

    def close(self) -> None:
        self.raw.close()


class HttpStream(_Stream):
    """An http(s) GET as a stream that survives dropped connections: a failed or short read
    reconnects with ``Range: bytes=<read so far>-`` (a 200 answer is read past that many bytes)
    up to :data:`HTTP_RETRIES` times, waiting :data:`HTTP_BACKOFF_S`, twice that, ... between."""

    def __init__(self, url: str):
        self.url, self.pos, self.size = url, 0, None
        self.retries = 0
        self.resp = self._connect()

    def _connect(self):
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        req = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise ShardError(self.url, "not found (HTTP 404)") from None
            raise ShardError(self.url, f"HTTP {exc.code} {exc.reason}") from None
        if self.size is None:
            length = resp.headers.get("Content-Length")
            self.size = int(length) if length and resp.status == 200 else None
        if self.pos and resp.status != 206:     # no range support: skip what we have
            left = self.pos
            while left:
                chunk = resp.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError("connection lost while skipping to the resume point")
                left -= len(chunk)
        return resp

    def _retry(self, exc: Exception) -> None:
        if self.retries >= HTTP_RETRIES:
            raise ShardError(self.url, f"connection lost at byte {self.pos} after "
                                       f"{self.retries} retries ({type(exc).__name__}: "
                                       f"{exc})") from None
        self.retries += 1
        _log.warning("%s: connection lost at byte %d (%s: %s); retry %d of %d", self.url,
                     self.pos, type(exc).__name__, exc, self.retries, HTTP_RETRIES)
        time.sleep(HTTP_BACKOFF_S * 2 ** (self.retries - 1))
        try:
            self.resp.close()
        except OSError:
            pass
        try:
            self.resp = self._connect()
        except (OSError, http.client.HTTPException) as again:   # URLError is an OSError
            self._retry(again)

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data = self.resp.read() if size is None or size < 0 else self.resp.read(size)
            except (OSError, http.client.HTTPException) as exc:   # IncompleteRead, reset, timeout
                self._retry(exc)
                continue
            if not data and self.size is not None and self.pos < self.size:
                self._retry(ConnectionError(f"stream ended at byte {self.pos} of {self.size}"))
                continue
            self.pos += len(data)
            return data

    def close(self) -> None:
        self.resp.close()


class PipeStream(_Stream):
    """A shell command's standard output; a non-zero exit is a ShardError with its stderr."""

    def __init__(self, command: str):
        self.command = command
        self.err = tempfile.TemporaryFile()     # not a pipe: a chatty command cannot block
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                     stderr=self.err)

    def read(self, size: int = -1) -> bytes:
        data = self.proc.stdout.read(size)
        if not data:
            self._check()
        return data

    def _check(self) -> None:
        code = self.proc.wait()
        if code != 0:
            self.err.seek(0)
            err = self.err.read().decode("utf-8", "replace").strip()
            raise ShardError(f"pipe:{self.command}", f"command exited with {code}"
                                                     + (f": {err[-300:]}" if err else ""))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


def manifest_json(source: ShardSource) -> tuple[dict, str]:
    """The parsed manifest and the sha256 of its bytes (what extraction records)."""
    data = source.read_manifest_bytes()
    where = source.manifest_location
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ShardError(where, f"not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ShardError(where, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    return manifest, hashlib.sha256(data).hexdigest()

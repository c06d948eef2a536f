"""Readers of item shards, as ``IterableDataset``s for ``torch.utils.data.DataLoader``.

* :class:`ExactlyOnceItems` (extraction): every item exactly once across ranks x workers.
  With at least as many shards as readers (ranks x workers) shards are dealt round-robin; with
  fewer, WebDataset's own splitters fail or give uneven ranks (see docs/data.md), so every reader
  scans all shards and keeps the items whose ``index % readers`` is its own (``split="item"``).
* :class:`StreamingItems` (training): resampled; an epoch is a fixed number of samples per rank,
  equal on every rank (a collective per batch never waits for a rank that ran dry). The shard
  order of an epoch is shuffled from ``(seed, epoch)``, so all ranks agree on it; the epoch is a
  :class:`SharedEpoch`, which persistent dataloader workers see change.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from typing import Iterator, Literal

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ptmrec_dist import seeds
from ptmrec_dist.data.catalog import ImageTooLarge, open_image
from ptmrec_dist.data.shards import item_key, load_manifest, verify_shards
from ptmrec_dist.data.sources import shard_source
from ptmrec_dist.errors import ShardError
from ptmrec_dist.logs import get_logger

Decode = Literal["pil", "bytes", "none"]
_log = get_logger(__name__)


class SharedEpoch:
    """An epoch counter shared with dataloader worker processes."""

    def __init__(self, epoch: int = 0):
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


def iter_shard(path, on_bad_sample: str = "error", n_items: int | None = None,
               opener=None) -> Iterator[dict]:
    """Raw samples of one shard; a truncated or corrupt tar raises ShardError naming it.

    ``n_items`` (from the manifest): a tar cut at a member boundary reads as a shorter valid tar,
    so a shard yielding another number of samples is a truncated one too. ``opener``: a remote
    shard's :class:`~ptmrec_dist.data.sources.CheckedStream` factory (``path`` then only names
    it): its last sample is held back until the stream's size and sha256 were checked, so no
    consumer sees a bad shard through to its end; a mismatch is an error whatever
    ``on_bad_sample`` says (its other items were read already)."""
    n = 0
    try:
        # ours to close, unlike webdataset's url opener
        with (opener() if opener is not None else open(path, "rb")) as stream:
            files = tar_file_expander([{"url": str(path), "stream": stream}])
            held = None
            for sample in group_by_keys(files):
                if held is not None:
                    n += 1
                    yield held
                held = sample
            if opener is not None:
                stream.finish()
            if held is not None:
                n += 1
                yield held
    except Exception as exc:   # tarfile.ReadError, EOFError, ValueError from webdataset
        if isinstance(exc, ShardError):
            raise
        detail = f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
        if on_bad_sample == "error":
            raise ShardError(path, f"unreadable tar ({detail})") from None
        _log.warning("%s: unreadable tar, rest of shard skipped (%s)", path, detail)
        return
    if n_items is not None and n != n_items:
        if on_bad_sample == "error":
            raise ShardError(path, f"truncated shard: {n} items read, manifest.json says "
                                   f"{n_items}")
        _log.warning("%s: truncated shard, %d of %d items read", path, n, n_items)


def decode_sample(sample: dict, decode: Decode = "pil") -> dict:
    """A raw sample -> ``{"index", "item_id", "text"[, "image"]}``. A missing or bad member (a
    ``.json`` that is not JSON or lacks ``index``/``item_id``, a key that is not its index, text
    that is not UTF-8, an undecodable or too large image) is a :class:`ShardError` naming the
    shard and the member, whatever ``on_bad_sample`` says: our writer never makes such a member,
    so the shard is corrupt (a verified one was made so), and a streaming reader cannot drop a
    sample without leaving its rank short of the others."""
    url = sample.get("__url__", "?")
    key = sample.get("__key__")
    for part in ("jpg", "txt", "json"):
        if part not in sample:
            raise ShardError(url, f"sample {key!r} has no {part!r} member")
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:    # JSONDecodeError, UnicodeDecodeError
        raise ShardError(url, f"member {key}.json: invalid JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("index"), int) or \
            isinstance(meta["index"], bool) or "item_id" not in meta:
        raise ShardError(url, f"member {key}.json: expected a JSON object with 'index' and "
                              f"'item_id', got {str(meta)[:80]}")
    if key != item_key(meta["index"]):
        raise ShardError(url, f"sample key {key!r} does not match its index {meta['index']}")
    try:
        text = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardError(url, f"member {key}.txt: not UTF-8 ({exc.reason})") from None
    out = {"index": meta["index"], "item_id": meta["item_id"], "text": text}
    if decode == "pil":
        try:
            with open_image(io.BytesIO(sample["jpg"])) as img:
                out["image"] = img.convert("RGB")
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            raise ShardError(url, f"member {key}.jpg: {exc}") from None
        except MemoryError:
            raise
        except Exception as exc:   # noqa: BLE001  Pillow's decoders raise many types
            raise ShardError(url, f"member {key}.jpg: undecodable image "
                                  f"({type(exc).__name__}: {exc})") from None
    elif decode == "bytes":
        out["image"] = sample["jpg"]
    return out


def collate_items(batch: list[dict]) -> dict:
    """Batch of item dicts -> ``{"index": LongTensor, "item_id": [...], "text": [...], ...}``."""
    out = {key: [b[key] for b in batch] for key in batch[0]}
    out["index"] = torch.tensor(out["index"], dtype=torch.long)
    return out


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardReader(IterableDataset):
    """What both readers share: the manifest, the slot arithmetic, shard verification."""

    def __init__(self, shard_dir, rank: int, world_size: int, num_workers: int,
                 decode: Decode, on_bad_sample: str, split: str, names=None):
        super().__init__()
        self.source = shard_source(shard_dir)
        self.shard_dir = self.source.where       # names the shards in messages
        self.manifest = load_manifest(self.source)
        if names is not None:   # read only these shards (e.g. the unfinished ones of a rank)
            self.manifest = {**self.manifest,
                             "shards": [e for e in self.manifest["shards"] if e["name"] in names]}
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.n_slots = world_size * self.num_workers
        self.decode, self.on_bad_sample = decode, on_bad_sample
        n_shards = len(self.manifest["shards"])
        if split == "auto":
            split = "shard" if n_shards >= self.n_slots else "item"
        if split == "shard" and n_shards < self.n_slots:
            raise ShardError(self.shard_dir, f"{n_shards} shards for {world_size} ranks x "
                                             f"{self.num_workers} workers = {self.n_slots} readers: "
                                             "use fewer workers, a smaller --shard-size, or split='item'")
        self.split = split

    def _slot(self) -> int:
        wid, n = _worker()
        if n != self.num_workers:
            raise RuntimeError(f"reader built for num_workers={self.num_workers} but the "
                               f"DataLoader runs {n} workers: pass the same number to both")
        return self.rank * self.num_workers + wid

    def _verify(self, names) -> list[dict]:
        good, bad = verify_shards(self.source, self.manifest, names=names,
                                  on_bad_sample=self.on_bad_sample)
        self.skipped = bad
        if bad.total:
            lost = sum(e["n_items"] for e in self.manifest["shards"] if e["name"] in
                       {i for ids in bad.first_ids.values() for i in ids})
            _log.warning("%s: %s (at least %d items not read)", self.shard_dir,
                         bad.message("shards"), lost)
        return good

    def _samples(self, entries, slot: int | None) -> Iterator[dict]:
        for entry in entries:
            where, opener = self.source.reader_args(entry)
            for sample in iter_shard(where, self.on_bad_sample, entry["n_items"], opener):
                if slot is not None and int(sample["__key__"]) % self.n_slots != slot:
                    continue
                yield sample


class ExactlyOnceItems(_ShardReader):
    def __init__(self, shard_dir, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 decode: Decode = "pil", on_bad_sample: str = "error",
                 split: Literal["auto", "shard", "item"] = "auto", verify: bool = True,
                 names=None):
        super().__init__(shard_dir, rank, world_size, num_workers, decode, on_bad_sample, split,
                         names)
        entries = self.manifest["shards"]
        if self.split == "shard":   # this rank reads the shards dealt to its workers' slots
            mine = [e for k, e in enumerate(entries)
                    if (k % self.n_slots) // self.num_workers == rank]
        else:
            mine = entries
        self.entries = self._verify({e["name"] for e in mine}) if verify else mine

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        if self.split == "shard":
            index = {e["name"]: k for k, e in enumerate(self.manifest["shards"])}
            entries = [e for e in self.entries if index[e["name"]] % self.n_slots == slot]
            samples = self._samples(entries, None)
        else:
            samples = self._samples(self.entries, slot)
        for sample in samples:
            yield decode_sample(sample, self.decode)


class StreamingItems(_ShardReader):
    def __init__(self, shard_dir, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, epoch: SharedEpoch | None = None,
                 samples_per_epoch: int | None = None, shuffle_buffer: int = 256,
                 decode: Decode = "pil", on_bad_sample: str = "error", verify: bool = True,
                 batch_size: int = 1, skip: SharedEpoch | None = None, passes: int = 1):
        super().__init__(shard_dir, rank, world_size, num_workers, decode, on_bad_sample, "auto")
        self.seed = seed
        self.epoch = epoch if epoch is not None else SharedEpoch(0)
        # resuming mid-epoch: the DataLoader batches (of ``batch_size``) already consumed this
        # epoch; each worker drops its share undecoded (:meth:`skipped_samples`)
        self.batch_size = batch_size
        self.skip = skip if skip is not None else SharedEpoch(0)
        self.entries = self._verify(None) if verify else list(self.manifest["shards"])
        if not self.entries:
            raise ShardError(self.shard_dir, "no readable shards")
        total = samples_per_epoch or passes * sum(e["n_items"] for e in self.entries)
        self.samples_per_rank = -(-total // world_size)
        self.shuffle_buffer = shuffle_buffer

    def worker_quota(self, worker: int) -> int:
        base, extra = divmod(self.samples_per_rank, self.num_workers)
        return base + (1 if worker < extra else 0)

    def __len__(self) -> int:
        return self.samples_per_rank

    def worker_batches(self) -> list[int]:
        """DataLoader batches each worker yields in an epoch (its last one may be short)."""
        return [-(-self.worker_quota(w) // self.batch_size) for w in range(self.num_workers)]

    def _deal(self, batches: int) -> tuple[list[int], int]:
        """How the DataLoader deals an epoch's first ``batches`` batches: it takes them from
        its workers in turn (0, 1, ...), passing over exhausted ones. Returns the batches taken
        from each worker and the worker whose turn is next."""
        left, taken = self.worker_batches(), [0] * self.num_workers
        w = 0
        for _ in range(min(batches, sum(left))):
            while taken[w] == left[w]:
                w = (w + 1) % self.num_workers
            taken[w] += 1
            w = (w + 1) % self.num_workers
        return taken, w

    def skip_start(self, batches: int) -> int:
        """The batch a resumed epoch's DataLoader starts at when ``batches`` were consumed: the
        largest ``k <= batches`` after which the turn is back at the first worker with batches
        left (a new DataLoader iterator starts dealing at worker 0); the caller drops the
        ``batches - k`` (< workers) batches between."""
        for k in range(batches, -1, -1):
            taken, nxt = self._deal(k)
            left = self.worker_batches()
            if all(taken[w] == left[w] for w in range(nxt)):
                return k
        return 0

    def skipped_samples(self, worker: int, batches: int) -> int:
        """Samples ``worker`` drops undecoded for a resumed epoch (``batches`` consumed)."""
        taken, _ = self._deal(self.skip_start(batches))
        return min(taken[worker] * self.batch_size, self.worker_quota(worker))

    def _cycle(self, entries, slot, rng) -> Iterator[dict]:
        while True:
            n = 0
            for k in rng.permutation(len(entries)):
                for sample in self._samples([entries[k]], slot):
                    n += 1
                    yield sample
            if n == 0:
                raise ShardError(self.shard_dir, f"reader slot {slot} found no samples")

    def __iter__(self) -> Iterator[dict]:
        slot = self._slot()
        epoch = self.epoch.get()
        if self.split == "shard":
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries))
            # shard mode: at least as many shards as slots, so every slot gets one
            entries = [self.entries[k] for k in order[slot::self.n_slots]]
            source = self._cycle(entries, None, np.random.default_rng([self.seed, epoch, slot]))
        else:
            source = self._cycle(self.entries, slot, np.random.default_rng([self.seed, epoch, slot]))
        rng = np.random.default_rng([self.seed, epoch, slot, seeds.READER_SAMPLES])
        quota = self.worker_quota(slot % self.num_workers)
        skip = self.skipped_samples(slot % self.num_workers, self.skip.get())
        buffer: list[dict] = []
        drawn = 0
        for n in range(quota):
            # draw exactly ``quota`` samples from the source and shuffle those: filling the
            # buffer past the quota would start the next cycle of the slot's items (yielding
            # some twice) while items of this cycle stayed behind in the buffer (unseen)
            while len(buffer) < max(1, self.shuffle_buffer) and drawn < quota:
                buffer.append(next(source))
                drawn += 1
            k = int(rng.integers(len(buffer)))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            sample = buffer.pop()
            if n >= skip:
                yield decode_sample(sample, self.decode)

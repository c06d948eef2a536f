"""``ptmrec recommend --run RUN``: each user's top-k items, by raw id, from a finished run.

A run folder of stage 1 or stage 2 holds ``user_repr.npy``, ``item_repr.npy`` and its resolved
``config.yaml``; the scores are ``user_repr[u] @ item_repr.T`` (what ``ptmrec evaluate`` ranks
by), ranked as the evaluator ranks (:func:`~ptmrec_dist.eval.metrics.topk_items`: descending
score, ties by the lower item index), chunked over users so memory stays bounded
(``eval.chunk_users`` / ``eval.memory_mb`` of the run's config).

Users are named, and items reported, by **raw id**: the ids of the interactions file (a CSV's
strings; an ``.inter`` file's integers, which are the indices), or, where ``ptmrec catalog``
owns the index, the catalog's ``item_mapping.tsv`` (and its ``user_mapping.tsv`` when the run
read the catalog's own ``interactions.inter``). ``exclude_seen`` leaves out every item the user
interacted with in the run's interactions as loaded: train, valid and test rows (what a user
means by "items I have not seen"; ``evaluate`` masks only the training rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import catalog_item_space, load_interactions
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.eval.evaluate import load_representations, score_function
from ptmrec_dist.eval.metrics import (USER_TILE, chunk_size, chunk_topk,
                                      chunk_topk_blocked, item_block)
from ptmrec_dist.io import temp_file_near


class IdMap:
    """Raw ids <-> indices of one side (users or items). ``raw`` holds the raw id of every index
    (strings); None: the index is the id (``.inter`` files)."""

    def __init__(self, raw: np.ndarray | None, n: int):
        self.n = n
        self.raw = None if raw is None else np.asarray(raw).astype(str)
        if self.raw is not None:
            self.order = np.argsort(self.raw, kind="stable")
            self.sorted = self.raw[self.order]

    def index(self, ids: list[str]) -> np.ndarray:
        """Indices of raw ids; -1 where an id is unknown."""
        if self.raw is None:
            return np.array([int(i) if i.isascii() and i.isdigit() and len(i) <= 18
                             and int(i) < self.n else -1 for i in ids], dtype=np.int64)
        ids = np.asarray(ids, dtype=str)
        if not len(ids) or not self.n:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, ids), self.n - 1)
        return np.where(self.sorted[pos] == ids, self.order[pos], -1).astype(np.int64)

    def names(self, index: np.ndarray) -> list[str]:
        return [str(i) for i in index.tolist()] if self.raw is None else self.raw[index].tolist()


def read_mapping(path: Path, n: int) -> np.ndarray:
    """A ``raw id <tab> index`` file (``ptmrec catalog``'s; a header line, as
    ``Interactions.save_mappings`` writes, is skipped) -> raw id of each of ``n`` indices."""
    raw = np.full(n, "", dtype=object)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 2 or (line_no == 1 and not parts[1].isdecimal()):
            if line_no == 1 and len(parts) == 2:
                continue
            raise InputError(path, "expected 'raw id <tab> index'", line=line_no)
        if not parts[1].isdecimal() or int(parts[1]) >= n:
            raise InputError(path, f"index {parts[1]!r} is not one of the run's {n}", line=line_no)
        raw[int(parts[1])] = parts[0]
    missing = np.flatnonzero(raw == "")
    if len(missing):
        raise InputError(path, f"{len(missing)} of the run's {n} indices have no raw id "
                               f"(first: {int(missing[0])})")
    return raw.astype(str)


def id_maps(cfg, inter) -> tuple[IdMap, IdMap]:
    """``(users, items)`` id maps of the run's interactions (see the module docstring)."""
    users = IdMap(inter.user_ids, inter.n_users)
    items = IdMap(inter.item_ids, inter.n_items)
    space = catalog_item_space(cfg.data.catalog, inter.path)
    if space is not None:
        folder = space[1].parent
        if (folder / "item_mapping.tsv").is_file():
            items = IdMap(read_mapping(folder / "item_mapping.tsv", inter.n_items),
                          inter.n_items)
        own = inter.path.parent.resolve() == folder.resolve()
        if own and (folder / "user_mapping.tsv").is_file():
            users = IdMap(read_mapping(folder / "user_mapping.tsv", inter.n_users),
                          inter.n_users)
    return users, items


class RunRecommender:
    """A finished run loaded once: its representations, interactions and id maps."""

    def __init__(self, run: str | Path, new_items: str | Path | None = None,
                 only_new: bool = False):
        """``new_items``: an ``encode-items`` output folder whose items join the candidates
        (after the run's own, with their raw ids); ``only_new``: rank those alone."""
        self.run = Path(run)
        if not (self.run / "config.yaml").is_file():
            raise InputError(self.run / "config.yaml", "missing: not a run folder")
        self.cfg = load_config(self.run / "config.yaml")
        self.inter = load_interactions(self.cfg.data.path, self.cfg.data, warn=lambda _m: None)
        users_r, items_r = load_representations(self.run)
        if users_r.shape[0] != self.inter.n_users or items_r.shape[0] != self.inter.n_items:
            raise InputError(self.run / "user_repr.npy",
                             f"representations are {users_r.shape[0]} users x "
                             f"{items_r.shape[0]} items, the interactions {self.inter.path} "
                             f"{self.inter.n_users} x {self.inter.n_items}")
        # fp32 as the evaluator scores them: the scores reported are the ones ranked by
        self.reps = (torch.from_numpy(users_r.astype(np.float32)),
                     torch.from_numpy(items_r.astype(np.float32)))
        self.users, self.items = id_maps(self.cfg, self.inter)
        self.n_items, self.exclude = self.inter.n_items, None
        if new_items is not None:
            self._add_new_items(Path(new_items), only_new)
        elif only_new:
            raise ConfigError("--only-new needs --new-items DIR (from `ptmrec encode-items`)")

    def _add_new_items(self, folder: Path, only_new: bool) -> None:
        from ptmrec_dist.eval.new_items import IDS, read_new_items

        ids, reprs = read_new_items(folder, self.reps[1].shape[1])
        known = self.items.index(ids)
        if (known >= 0).any():
            k = int(np.flatnonzero(known >= 0)[0])
            raise InputError(folder / IDS, f"item id {ids[k]!r} is already one of the run's "
                                           "items: new items need new ids", line=k + 1)
        old = self.items.names(np.arange(self.n_items))
        self.items = IdMap(np.asarray(old + ids), self.n_items + len(ids))
        self.reps = (self.reps[0], torch.cat([self.reps[1], torch.from_numpy(
            reprs.astype(np.float32))]))
        if only_new:
            self.exclude = torch.zeros(self.n_items + len(ids), dtype=torch.bool)
            self.exclude[:self.n_items] = True
        self.n_items += len(ids)

    def seen(self) -> sp.csr_matrix:
        """Every (user, item) of the loaded interactions, train, valid and test."""
        i = self.inter
        return sp.csr_matrix((np.ones(len(i.users), dtype=np.float32), (i.users, i.items)),
                             shape=(i.n_users, self.n_items))

    def user_index(self, ids: list[str], source: str | Path | None = None,
                   lines: list[int] | None = None) -> np.ndarray:
        """Indices of raw user ids; an unknown one is an :class:`InputError` naming it (and
        the ``source`` file and line it came from)."""
        index = self.users.index(ids)
        bad = np.flatnonzero(index < 0)
        if len(bad):
            k = int(bad[0])
            more = f" ({len(bad) - 1} more unknown)" if len(bad) > 1 else ""
            raise InputError(source, f"unknown user id {ids[k]!r}: not in the interactions "
                                     f"{self.inter.path} that the run {self.run} was trained "
                                     f"on{more}", line=lines[k] if lines else None)
        return index

    def all_users(self) -> np.ndarray:
        """Every user with an interaction in the loaded interactions (index gaps of an
        ``.inter`` file are no users)."""
        return np.flatnonzero(np.bincount(self.inter.users, minlength=self.inter.n_users))

    def top(self, users: np.ndarray, k: int = 20, exclude_seen: bool = False,
            chunk_users: int | None = None) -> Iterator[dict]:
        """``{"user_id", "item_ids", "scores"}`` per user of ``users`` (indices), in order: the
        top-``k`` items by descending score (fewer where fewer items are left)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        n_items = self.n_items
        mask = self.seen() if exclude_seen else sp.csr_matrix((self.inter.n_users, n_items),
                                                              dtype=np.float32)
        e = self.cfg.eval
        score_fn = score_function(self.reps, self.exclude)
        block = item_block(score_fn, n_items)      # large catalogs: tiles, as the evaluator
        chunk = chunk_users or e.chunk_users or (8 * USER_TILE if block else
                                                 chunk_size(n_items, 0, e.memory_mb))
        for start in range(0, len(users), chunk):
            u = np.asarray(users[start:start + chunk], dtype=np.int64)
            if block:
                top, values = chunk_topk_blocked(score_fn.block, u, mask, k, n_items, block,
                                                 with_scores=True)
            else:
                scores = _Kept(score_fn)
                top = chunk_topk(scores, u, mask, k)
                values = torch.gather(scores.last, 1, top.clamp_min(0))
            values, top = values.numpy(), top.numpy()
            for row, user in enumerate(self.users.names(u)):
                keep = top[row] >= 0          # -1: no item left at that place
                yield {"user_id": user, "item_ids": self.items.names(top[row][keep]),
                       "scores": [float(v) for v in values[row][keep]]}


class _Kept:
    """A score function that keeps its last output: :func:`chunk_topk` ranks by it (masking
    excluded items in place), and the reported scores are read from the same matrix."""

    def __init__(self, score_fn):
        self.score_fn, self.last = score_fn, None

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        self.last = self.score_fn(users)
        return self.last


def read_user_file(path: str | Path) -> tuple[list[str], list[int]]:
    """``(raw ids, line numbers)`` of a file with one raw user id per line (blank lines and
    surrounding spaces ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the user list: {exc}") from None
    ids, lines = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            ids.append(line.strip())
            lines.append(line_no)
    return ids, lines


def recommend(run: str | Path, users: Iterable, k: int = 20,
              exclude_seen: bool = False) -> list[dict]:
    """Top-``k`` items of each raw user id in ``users`` from the finished run ``run``:
    ``[{"user_id", "item_ids", "scores"}]`` in the order given (see the module docstring)."""
    rec = RunRecommender(run)
    ids = [str(u) for u in users]
    return list(rec.top(rec.user_index(ids), k, exclude_seen))


def recommend_all(run: str | Path, k: int = 20, exclude_seen: bool = False,
                  chunk_users: int | None = None) -> Iterator[dict]:
    """:func:`recommend` for every user of the run (:meth:`RunRecommender.all_users`),
    lazily, one chunk of users scored at a time."""
    rec = RunRecommender(run)
    yield from rec.top(rec.all_users(), k, exclude_seen, chunk_users)


def write_jsonl(records: Iterable[dict], path: str | Path | None) -> int:
    """Records as JSON lines into ``path`` (atomically, streamed), or to stdout when None;
    returns how many."""
    import sys

    n = 0
    if path is None:
        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        return n
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ConfigError(f"--out {path}: use a .jsonl file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_near(path)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return n

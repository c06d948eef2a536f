"""User-item interactions: MMRec ``.inter`` and plain CSV in, split CSR matrices out.

* ``.inter`` (MMRec): tab-separated with a header; ``userID itemID`` plus optional ``rating``,
  ``timestamp``, ``x_label``. The integer ids are the indices, so each one up to the largest
  costs memory (an embedding row, a slot in every per-user/per-item array): ids above
  :data:`MAX_INDEX` are refused with their line. Give such ids as CSV instead.
* CSV: ``user,item[,timestamp]`` (a header line is optional); raw ids are strings of any length,
  mapped to indices in sorted order; :meth:`Interactions.save_mappings` writes the mapping.

Both are read as UTF-8 with an optional byte-order mark, with LF or CRLF line endings. A split
without training rows is refused when loading; one without valid rows where valid is needed
(``need_valid``: the training stages, which choose their epoch on it).
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ptmrec_dist.config import DataConfig
from ptmrec_dist.data.splits import COLD, SPLIT_NAMES, TEST, TRAIN, VALID, cold_item_choice, \
    leave_last_out_labels, random_split_labels, subsample_per_user
from ptmrec_dist.data.table import MAX_DIGITS, Table, read_table
from ptmrec_dist.errors import InputError
from ptmrec_dist.io import atomic_write_text

ALIASES = {
    "userid": "user", "user_id": "user", "user": "user", "uid": "user",
    "itemid": "item", "item_id": "item", "item": "item", "iid": "item",
    "rating": "rating", "timestamp": "timestamp", "time": "timestamp", "x_label": "x_label",
}
CSV_POSITIONAL = ["user", "item", "timestamp"]
NOT_INTERACTIONS = ("_mapping.csv", "_url.csv")   # MMRec's companion files in a data folder
# the largest id a .inter file may use as an index (the arrays of the index space are sized
# by the largest id, not by the number of distinct ids)
MAX_INDEX = 100_000_000
INDEX_TOO_LARGE = (" (.inter ids are the indices, and every index up to the largest costs memory;"
                   " give large or sparse ids as CSV user,item, which maps them to indices)")


@dataclass
class Interactions:
    path: Path
    format: str                          # "inter" | "csv"
    n_users: int
    n_items: int
    users: np.ndarray                    # int64 index per interaction (after dedup and drops)
    items: np.ndarray
    labels: np.ndarray                   # int8: 0 train, 1 valid, 2 test
    split_rule: str
    user_ids: np.ndarray | None = None   # raw ids by index (CSV); None: the index is the id
    item_ids: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    raw_rows: int = 0
    duplicates_removed: int = 0
    dropped_eval: int = 0                # valid/test rows of users with no train row (MMRec drops)
    subsampled_out: int = 0              # rows left out by data.subsample
    cold_items: np.ndarray | None = None  # item indices held out entirely (data.cold_items)
    _csr: dict = field(default_factory=dict, repr=False)

    def csr(self, split: str = "train") -> sp.csr_matrix:
        """Binary users x items CSR matrix of one split (cached): train, valid, test, or cold
        (the interactions of the held-out items of ``data.cold_items``)."""
        if split not in self._csr:
            mask = self.labels == (COLD if split == "cold" else SPLIT_NAMES.index(split))
            u, i = self.users[mask], self.items[mask]
            self._csr[split] = sp.csr_matrix(
                (np.ones(len(u), dtype=np.float32), (u, i)), shape=(self.n_users, self.n_items))
        return self._csr[split]

    @property
    def train(self) -> sp.csr_matrix:
        return self.csr("train")

    @property
    def valid(self) -> sp.csr_matrix:
        return self.csr("valid")

    @property
    def test(self) -> sp.csr_matrix:
        return self.csr("test")

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=COLD + 1)
        out = {name: int(counts[k]) for k, name in enumerate(SPLIT_NAMES)}
        if self.has_cold:
            out["cold"] = int(counts[COLD])
        return out

    @property
    def has_cold(self) -> bool:
        return self.cold_items is not None and len(self.cold_items) > 0

    def cold_mask(self) -> np.ndarray:
        """Boolean per item: held out (cold start)."""
        mask = np.zeros(self.n_items, dtype=bool)
        if self.has_cold:
            mask[self.cold_items] = True
        return mask

    def stats(self) -> dict:
        per_user = np.bincount(self.users, minlength=self.n_users)
        present = per_user[per_user > 0]
        train_users = np.bincount(self.users[self.labels == TRAIN], minlength=self.n_users)
        return {
            "path": str(self.path), "format": self.format,
            "users": self.n_users, "items": self.n_items, "interactions": len(self.users),
            "splits": self.split_counts(), "split_rule": self.split_rule,
            "density": len(self.users) / max(1, self.n_users * self.n_items),
            "users_with_interactions": int(len(present)),
            "items_with_interactions": int((np.bincount(self.items, minlength=self.n_items) > 0).sum()),
            "users_without_train": int((train_users == 0).sum()),
            "interactions_per_user": {
                "min": int(present.min()) if len(present) else 0,
                "median": float(np.median(present)) if len(present) else 0.0,
                "max": int(present.max()) if len(present) else 0},
            "raw_rows": self.raw_rows, "duplicates_removed": self.duplicates_removed,
            "dropped_eval_without_train": self.dropped_eval,
            "subsampled_out": self.subsampled_out,
            "cold_items": int(len(self.cold_items)) if self.has_cold else 0,
        }

    def item_index(self, raw_ids) -> np.ndarray:
        """Indices of raw item ids (strings or ints); -1 where the id is unknown."""
        return _lookup(self.item_ids, self.n_items, raw_ids)

    def save_mappings(self, out_dir: str | Path) -> list[Path]:
        """Write ``user_mapping.tsv`` / ``item_mapping.tsv`` (raw id <tab> index), CSV input only."""
        written = []
        for name, ids in (("user", self.user_ids), ("item", self.item_ids)):
            if ids is None:
                continue
            path = Path(out_dir) / f"{name}_mapping.tsv"
            body = "\n".join(f"{raw}\t{k}" for k, raw in enumerate(ids.tolist()))
            atomic_write_text(path, f"{name}_id\t{name}_index\n{body}\n")
            written.append(path)
        return written


def _lookup(sorted_ids: np.ndarray | None, n: int, raw_ids) -> np.ndarray:
    raw = np.asarray([str(r) for r in raw_ids])
    if sorted_ids is None:
        ok = np.strings.isdecimal(raw) if len(raw) else np.zeros(0, bool)
        if len(raw):     # beyond int64 (and beyond any index): unknown, not an overflow
            ok &= np.strings.str_len(np.strings.lstrip(raw, "0")) <= MAX_DIGITS
        out = np.full(len(raw), -1, dtype=np.int64)
        out[ok] = raw[ok].astype(np.int64)
        out[out >= n] = -1
        return out
    pos = np.searchsorted(sorted_ids, raw)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos_c] == raw, pos_c, -1).astype(np.int64)


def find_interactions_file(path: str | Path) -> Path:
    """``path`` itself if a file; in a folder the single ``*.inter``, else the single ``*.csv``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise InputError(path, "no such file or folder")
    for pattern in ("*.inter", "*.csv"):
        found = sorted(p for p in path.glob(pattern) if not p.name.endswith(NOT_INTERACTIONS))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise InputError(path, f"several interaction files ({names}); name one explicitly")
    raise InputError(path, "no interactions file (*.inter or *.csv) in this folder")


def _read(path: Path) -> tuple[Table, str]:
    if path.suffix == ".inter":
        table = read_table(path, "\t", None, ALIASES)
        return table, "inter"
    first = ""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                first = line
                break
    head = [c.strip().lower() for c in first.split(",")]
    has_header = bool(head) and head[0] in ALIASES and ALIASES[head[0]] == "user"
    if has_header:
        return read_table(path, ",", None, ALIASES), "csv"
    n_fields = len(head)
    if n_fields not in (2, 3):
        raise InputError(path, f"expected user,item[,timestamp], found {n_fields} fields", line=1)
    return read_table(path, ",", CSV_POSITIONAL[:n_fields], ALIASES), "csv"


@dataclass
class _Parsed:
    fmt: str
    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int
    raw_rows: int
    line_no: np.ndarray | None          # None on the fast path (no error can follow)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    labels: np.ndarray | None = None


def _parse_fast(path: Path) -> _Parsed | None:
    """All-numeric ``.inter`` through numpy's C reader (~10x the validating parser); None when
    anything is off, so that the validating parser names the exact line and field."""
    header_lines, line = 0, ""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            header_lines += 1
            if line.strip():
                break
    if not line.strip():
        return None
    names = [ALIASES.get(h.strip().split(":")[0].lower(), "?") for h in line.split("\t")]
    if "?" in names or len(set(names)) != len(names) or not {"user", "item"} <= set(names):
        return None
    ints = [k for k, n in enumerate(names) if n in ("user", "item", "x_label")]
    floats = [k for k, n in enumerate(names) if n in ("timestamp", "rating")]
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if not raw.isascii():
        # numpy 2.4's C reader can crash the process (a segmentation fault, intermittently) on
        # some rows of non-ASCII text; a numeric file is ASCII, anything else goes to the
        # validating parser, which names the line
        return None
    text = raw.decode("ascii")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "input contained no data"
            cols = np.loadtxt(io.StringIO(text, newline=None), delimiter="\t",
                              skiprows=header_lines, dtype=np.int64, comments=None,
                              usecols=ints, ndmin=2)
            fcols = np.loadtxt(io.StringIO(text, newline=None), delimiter="\t",
                               skiprows=header_lines, dtype=np.float64, comments=None,
                               usecols=floats, ndmin=2) if floats else None
    except (ValueError, OverflowError, UnicodeDecodeError):
        return None
    if not len(cols) or cols.min() < 0 or cols.max() > MAX_INDEX \
            or (fcols is not None and not np.isfinite(fcols).all()):
        return None
    col = {names[k]: cols[:, j] for j, k in enumerate(ints)}
    if "x_label" in col and col["x_label"].max() > TEST:
        return None
    users, items = col["user"], col["item"]
    ts = fcols[:, [names[k] for k in floats].index("timestamp")] \
        if "timestamp" in names else None
    return _Parsed("inter", users, items, int(users.max()) + 1, int(items.max()) + 1, len(users),
                   None, timestamps=ts, labels=col.get("x_label"))


def parse_interactions(path: Path, fast: bool = True) -> _Parsed:
    """The file's rows as dense user / item indices (ids, labels, timestamps when present),
    validated but neither deduplicated nor split; ``fast``: try numpy's reader on ``.inter``."""
    if fast and path.suffix == ".inter":
        fast = _parse_fast(path)
        if fast is not None:
            return fast
    table, fmt = _read(path)
    for required in ("user", "item"):
        if required not in table.values:
            raise InputError(path, f"missing column {required!r} (header has "
                                   f"{', '.join(table.columns)})", line=int(table.line_no[0]) - 1)
    user_ids = item_ids = None
    if fmt == "inter":
        users = table.ints("user", limit=MAX_INDEX, why=INDEX_TOO_LARGE)
        items = table.ints("item", limit=MAX_INDEX, why=INDEX_TOO_LARGE)
        n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    else:
        for name in ("user", "item"):
            empty = np.flatnonzero(np.strings.str_len(table.values[name]) == 0)
            if len(empty):
                raise table.fail(int(empty[0]), name, "empty id")
        user_ids, users = np.unique(table.values["user"], return_inverse=True)
        item_ids, items = np.unique(table.values["item"], return_inverse=True)
        n_users, n_items = len(user_ids), len(item_ids)
    timestamps = table.floats("timestamp") if "timestamp" in table.values else None
    if "rating" in table.values:
        table.floats("rating")   # validated; implicit feedback ignores its value
    labels = None
    if "x_label" in table.values:
        labels = table.ints("x_label", "an x_label of 0, 1 or 2")
        bad = np.flatnonzero(labels > TEST)
        if len(bad):
            raise table.fail(int(bad[0]), "x_label",
                             f"unknown x_label {labels[bad[0]]} (0 train, 1 valid, 2 test)")
    return _Parsed(fmt, users, items, n_users, n_items, len(table), table.line_no, user_ids,
                   item_ids, timestamps, labels)


def _line_of_row(path: Path, row: int) -> int:
    """File line of data row ``row`` (0-based, after the header, blank lines not counted).
    Only for messages, after the fast path, which keeps no line numbers."""
    seen = -1
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                if seen == row:
                    return line_no
                seen += 1
    return -1


def _first_occurrences(key: np.ndarray) -> np.ndarray:
    """Sorted row indices of the first occurrence of each key (a stable sort, no hashing)."""
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.r_[True, sorted_key[1:] != sorted_key[:-1]] if len(key) else np.zeros(0, bool)
    return np.sort(order[first])


def catalog_item_space(catalog: str | Path | None, interactions: Path) -> tuple[int, Path] | None:
    """``(n_items, catalog.json)`` when a catalog owns the item index: ``catalog.json`` (written
    by ``ptmrec catalog``) in ``catalog`` (``data.catalog``), else beside the interactions file;
    None when there is none (the interactions define the index)."""
    folder = Path(catalog) if catalog else interactions.parent
    summary = folder / "catalog.json"
    if not summary.is_file():
        return None
    try:
        n = json.loads(summary.read_text(encoding="utf-8"))["items"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(summary, f"not a catalog summary of `ptmrec catalog` ({exc!r})") from None
    if not isinstance(n, int) or n < 1:
        raise InputError(summary, f"'items' must be a positive integer, got {n!r}")
    return n, summary


def _apply_item_space(p: _Parsed, path: Path, catalog) -> int:
    """The number of items: the catalog's when one owns the index (the file's indices must fit
    in it), else the file's."""
    space = catalog_item_space(catalog, path)
    if space is None:
        return p.n_items
    n, summary = space
    if p.fmt != "inter":
        raise InputError(path, f"raw item ids, but the catalog {summary} defines the item index: "
                               "use its interactions.inter (or a subset of it) with indices")
    if p.n_items > n:
        row = int(np.flatnonzero(p.items >= n)[0])
        line = int(p.line_no[row]) if p.line_no is not None else _line_of_row(path, row)
        raise InputError(path, f"item index {int(p.items[row])} is outside the catalog {summary} "
                               f"({n} items)", line=line, field="itemID")
    return n


def _split_detail(rule: str, label: int) -> str:
    """Why a split can come out empty under ``rule`` (for messages)."""
    if rule == "x_label":
        return f"no row has x_label {label}"
    if label == TRAIN:
        return "no user kept a row for training"
    return "every user has fewer than 3 interactions, and such users keep all of them in train"


def check_valid_split(inter: Interactions) -> None:
    """A training run chooses its epoch (early stopping, the kept model) on valid: refuse
    interactions without valid rows instead of stopping on metrics of 0."""
    if not (inter.labels == VALID).any():
        raise InputError(inter.path, f"no valid interactions (data.split={inter.split_rule}: "
                                     f"{_split_detail(inter.split_rule, VALID)}), so nothing can "
                                     "choose the epoch: training stops early on valid metrics; "
                                     "give the file valid rows or use data.split=random")


def load_interactions(path: str | Path, cfg: DataConfig | None = None, warn=None,
                      catalog: str | Path | None = None,
                      need_valid: bool = False) -> Interactions:
    """Parse, validate, deduplicate, subsample and split. ``warn`` gets human-readable notices
    (stderr). The item count is the catalog's (``catalog``, else ``data.catalog``, else a
    ``catalog.json`` beside the file) when there is one: see :func:`catalog_item_space`.

    A split without training rows is an :class:`InputError`; so is one without valid rows when
    ``need_valid`` (training runs: :func:`check_valid_split`)."""
    cfg = cfg or DataConfig()
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    path = find_interactions_file(path)
    p = parse_interactions(path)
    users, items, labels, timestamps = p.users, p.items, p.labels, p.timestamps
    n_users, raw_rows = p.n_users, p.raw_rows
    n_items = _apply_item_space(p, path, catalog or cfg.catalog)
    user_ids, item_ids = p.user_ids, p.item_ids

    # duplicates: keep the first occurrence in file order
    keep = _first_occurrences(users * np.int64(n_items) + items)
    duplicates = raw_rows - len(keep)
    if duplicates:
        first_dup = int(np.flatnonzero(np.diff(np.r_[keep, raw_rows]) > 1)[0])
        dup_row = int(keep[first_dup]) + 1   # the first row that is not a first occurrence
        line = int(p.line_no[dup_row]) if p.line_no is not None else _line_of_row(path, dup_row)
        warn(f"{path}: {duplicates} duplicate (user, item) rows removed, first at line {line}")
        users, items = users[keep], items[keep]
        timestamps = timestamps[keep] if timestamps is not None else None
        labels = labels[keep] if labels is not None else None

    rule, subsampled_out = cfg.split, 0
    if cfg.subsample < 1:
        if rule == "x_label":
            raise InputError(path, "data.subsample < 1 draws a new split: set data.split to "
                                   "random or loo (not x_label)")
        keep = subsample_per_user(users, cfg.subsample, cfg.subsample_seed)
        subsampled_out = len(users) - len(keep)
        users, items = users[keep], items[keep]
        timestamps = timestamps[keep] if timestamps is not None else None
        labels = None
    if rule == "auto":
        rule = "x_label" if labels is not None else "random"
    # cold start: a seeded fraction of the items is held out with all its interactions; the
    # split rule sees only the other (warm) rows, so data.cold_items=0 changes nothing
    cold = cold_item_choice(items, n_items, cfg.cold_items, cfg.cold_seed) \
        if cfg.cold_items > 0 else None
    warm = ~np.isin(items, cold) if cold is not None else np.ones(len(items), dtype=bool)
    if rule == "x_label":
        if labels is None:
            raise InputError(path, "data.split=x_label but the file has no x_label column")
        labels = labels.astype(np.int8)
    elif rule == "random":
        labels = np.full(len(users), COLD, dtype=np.int8)
        labels[warm] = random_split_labels(users[warm], cfg.split_seed)
    else:
        if timestamps is None:
            raise InputError(path, "data.split=loo needs a timestamp column")
        labels = np.full(len(users), COLD, dtype=np.int8)
        labels[warm] = leave_last_out_labels(users[warm], timestamps[warm])
    labels[~warm] = COLD
    if not (labels == TRAIN).any():
        raise InputError(path, f"the train split is empty (data.split={rule}: "
                               f"{_split_detail(rule, TRAIN)}): there is nothing to train on, and "
                               "valid/test rows of users without training rows are dropped")

    # MMRec drops valid/test interactions of users that have no training interaction
    has_train = np.bincount(users[labels == TRAIN], minlength=n_users) > 0
    drop = (labels != TRAIN) & ~has_train[users]
    dropped = int(drop.sum())
    if dropped:
        warn(f"{path}: {dropped} valid/test{'/cold' if cold is not None else ''} interactions of "
             f"{len(np.unique(users[drop]))} users with no training interaction dropped")
        keep = ~drop
        users, items, labels = users[keep], items[keep], labels[keep]
        timestamps = timestamps[keep] if timestamps is not None else None
    inter = Interactions(path=path, format=p.fmt, n_users=n_users, n_items=n_items,
                         users=users, items=items, labels=labels, split_rule=rule,
                         user_ids=user_ids, item_ids=item_ids, timestamps=timestamps,
                         raw_rows=raw_rows, duplicates_removed=duplicates, dropped_eval=dropped,
                         subsampled_out=subsampled_out, cold_items=cold)
    if need_valid:
        check_valid_split(inter)
    return inter

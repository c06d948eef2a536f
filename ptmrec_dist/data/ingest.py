"""Reading a user's own item table and interactions, in the shapes they come in.

Item tables: CSV, TSV, JSON lines, or the Amazon metadata format (one object per line, JSON or the
older Python-literal variant with single quotes); ``.gz`` files are read compressed. Interactions:
CSV/TSV with a header (``user,item[,rating][,timestamp]`` under any of the usual column names),
or JSON lines such as the Amazon review files (``reviewerID``, ``asin``, ``overall``,
``unixReviewTime``). Every error names the file and line.

``ptmrec catalog`` (:mod:`ptmrec_dist.data.build_catalog`) turns what is read here into the
project's catalog and interaction formats.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import string
from pathlib import Path
from typing import Iterator

import numpy as np

from ptmrec_dist.errors import InputError

# column names recognised when the user names none (lower case), first match wins
USER_COLUMNS = ("user_id", "userid", "user", "uid", "reviewerid")
ITEM_COLUMNS = ("item_id", "itemid", "item", "iid", "movie_id", "movieid", "asin")
RATING_COLUMNS = ("rating", "overall", "score", "stars")
TIME_COLUMNS = ("timestamp", "unix_timestamp", "unixreviewtime", "time", "ts")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def table_format(path: Path) -> str:
    """``csv``, ``tsv`` or ``jsonl`` from the file name (``.gz`` looked through)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".csv",):
        return "csv"
    if last in (".tsv", ".tab", ".txt", ".inter"):
        return "tsv"
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise InputError(path, "unknown table format: name it .csv, .tsv, .jsonl or .json "
                           "(Amazon metadata), optionally .gz")


def _object(path: Path, line_no: int, text: str) -> dict:
    """One JSON object, or the Python-literal dict of the older Amazon metadata files."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise InputError(path, f"neither JSON nor a Python literal: {exc.msg} "
                                   f"(column {exc.colno})", line=line_no) from None
    if not isinstance(obj, dict):
        raise InputError(path, "expected one object per line", line=line_no)
    return obj


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_no, row)`` for every record of a CSV/TSV (with a header) or JSON-lines file;
    ``line_no`` is the line a record starts on."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    fmt = table_format(path)
    try:
        with _open_text(path) as f:
            if fmt == "jsonl":
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        yield line_no, _object(path, line_no, line)
                return
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header, start = None, 1
            for record in reader:
                if not any(cell.strip() for cell in record):
                    start = reader.line_num + 1
                    continue
                if header is None:
                    header = [h.strip() for h in record]
                    dup = {h for h in header if header.count(h) > 1}
                    if dup:
                        raise InputError(path, f"duplicate column {sorted(dup)[0]!r} in the "
                                               "header", line=start)
                elif len(record) != len(header):
                    raise InputError(path, f"expected {len(header)} fields ({', '.join(header)})"
                                           f", found {len(record)}", line=start)
                else:
                    yield start, dict(zip(header, record))
                start = reader.line_num + 1
            if header is None:
                raise InputError(path, "empty file (expected a header line)")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise InputError(path, f"malformed CSV: {exc}") from None


def cell_text(value) -> str:
    """A cell as text: lists (Amazon's ``description``, ``categories``) joined, numbers as
    written, missing values (None, NaN, blanks) as ""."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (cell_text(v) for v in value) if t)
    text = str(value).strip()
    return "" if text.lower() in ("nan", "none", "null") else text


class Template:
    """``"{title}. {overview}"`` over a row's columns; a missing or empty field is dropped
    together with the separator before it (so ``"{title}. {overview}"`` of a row without an
    overview is just the title), and a template never renders a dangling separator."""

    def __init__(self, template: str, what: str = "--text"):
        self.template = template
        try:
            self.parts = [(lit, name) for lit, name, spec, conv
                          in string.Formatter().parse(template)]
        except ValueError as exc:
            raise InputError(None, f"{what} {template!r}: {exc}") from None
        self.fields = [name for _, name in self.parts if name is not None]
        if any(not name for name in self.fields):
            raise InputError(None, f"{what} {template!r}: every {{}} must name a column")

    def render(self, row: dict) -> str:
        out = ""
        for literal, name in self.parts:
            if name is None:                 # the text after the last field
                out += literal if out else ""
                continue
            value = cell_text(row.get(name))
            if value:
                out += (literal if out else literal.lstrip(" .,;:-|")) + value
        return out.strip()

    def missing_columns(self, columns) -> list[str]:
        return [f for f in self.fields if f not in columns]


def pick_column(path: Path, columns, given: str | None, candidates: tuple[str, ...],
                what: str, required: bool = True) -> str | None:
    """The column named ``given``, or the first of ``candidates`` present (case-insensitive)."""
    if given:
        if given not in columns:
            raise InputError(path, f"no column {given!r} for {what} (columns: "
                                   f"{', '.join(columns)})")
        return given
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    if required:
        raise InputError(path, f"no {what} column among {', '.join(columns)} (name it with "
                               f"--{what}-column)")
    return None


def read_interactions(path: str | Path, user: str | None = None, item: str | None = None,
                      rating: str | None = None, timestamp: str | None = None) -> dict:
    """Raw interactions: ``users``, ``items`` (strings), ``ratings`` / ``timestamps``
    (float64, or None when the file has no such column), ``lines`` (the line of each row)."""
    path = Path(path)
    rows = list(read_rows(path))
    if not rows:
        raise InputError(path, "no interactions")
    columns = list(dict.fromkeys(k for _, row in rows[:1000] for k in row))
    names = {"user": pick_column(path, columns, user, USER_COLUMNS, "user"),
             "item": pick_column(path, columns, item, ITEM_COLUMNS, "item"),
             "rating": pick_column(path, columns, rating, RATING_COLUMNS, "rating", False),
             "timestamp": pick_column(path, columns, timestamp, TIME_COLUMNS, "timestamp",
                                      False)}
    out = {"lines": np.array([n for n, _ in rows], dtype=np.int64), "columns": names}
    for key in ("user", "item"):
        values = [cell_text(row.get(names[key])) for _, row in rows]
        empty = next((i for i, v in enumerate(values) if not v), None)
        if empty is not None:
            raise InputError(path, "empty id", line=rows[empty][0], field=names[key])
        out[f"{key}s"] = np.array(values, dtype=object)
    for key in ("rating", "timestamp"):
        out[f"{key}s"] = None if names[key] is None else _numbers(path, rows, names[key])
    return out


def _numbers(path: Path, rows: list, column: str) -> np.ndarray:
    values = np.empty(len(rows), dtype=np.float64)
    for i, (line_no, row) in enumerate(rows):
        text = cell_text(row.get(column))
        try:
            values[i] = float(text)
        except ValueError:
            values[i] = np.nan
        if not np.isfinite(values[i]):
            raise InputError(path, f"expected a finite number, got {text!r}", line=line_no,
                             field=column)
    return values

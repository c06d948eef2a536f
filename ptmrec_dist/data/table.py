"""Vectorised parsing of delimited interaction files with precise ``file:line: field`` errors.

The whole file is split with C-level string operations and checked with numpy's string ufuncs;
Python loops run only on the error path, to name the first bad line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptmrec_dist.errors import InputError

MAX_DIGITS = 18                      # every 18-digit number fits in int64
INT64_SAFE = 10 ** MAX_DIGITS - 1


@dataclass
class Table:
    path: Path
    columns: list[str]                 # canonical column names
    values: dict[str, np.ndarray]      # column -> stripped strings
    line_no: np.ndarray                # 1-based file line of each row

    def __len__(self) -> int:
        return len(self.line_no)

    def fail(self, row: int, column: str, message: str) -> InputError:
        return InputError(self.path, message, line=int(self.line_no[row]), field=column)

    def ints(self, column: str, what: str = "a non-negative integer",
             limit: int | None = None, why: str = "") -> np.ndarray:
        """The column as int64; a non-decimal cell, or one above ``limit`` (``why`` says why
        there is one), fails on its line. Never an overflow: more than 18 significant digits
        is above any limit."""
        col = self.values[column]
        ok = np.strings.isdecimal(col)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise self.fail(row, column, f"expected {what}, got {str(col[row])!r}")
        limit = INT64_SAFE if limit is None else min(limit, INT64_SAFE)
        long = np.strings.str_len(np.strings.lstrip(col, "0")) > MAX_DIGITS
        values = np.where(long, "0", col).astype(np.int64)
        above = long | (values > limit)
        if above.any():
            row = int(np.flatnonzero(above)[0])
            raise self.fail(row, column, f"{str(col[row])} is above {limit:,}{why}")
        return values

    def floats(self, column: str) -> np.ndarray:
        col = self.values[column]
        try:
            out = col.astype(np.float64)
        except ValueError:
            out = None
        if out is None or not np.isfinite(out).all():
            for row, text in enumerate(col.tolist()):  # error path only: find the first bad row
                try:
                    if np.isfinite(float(text)):
                        continue
                except ValueError:
                    pass
                raise self.fail(row, column, f"expected a finite number, got {text!r}")
        return out


def read_table(path: Path, delimiter: str, header: list[str] | None,
               aliases: dict[str, str]) -> Table:
    """Read ``path``; ``header`` None means the first non-blank line is the header.

    ``aliases`` maps lower-cased header names (MMRec's ``name:type`` suffix removed) to canonical
    column names; unknown header names are kept under their own name.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")     # a byte-order mark is not data
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = np.array(text.split("\n"))
    line_no = np.arange(1, len(lines) + 1)
    lines = np.strings.rstrip(lines, "\r")
    keep = np.strings.str_len(np.strings.strip(lines)) > 0   # blank lines carry no data
    lines, line_no = lines[keep], line_no[keep]
    if header is None:
        if not len(lines):
            raise InputError(path, "empty file (expected a header line)")
        raw_header = str(lines[0]).split(delimiter)
        header_line = int(line_no[0])
        lines, line_no = lines[1:], line_no[1:]
        names = [aliases.get(h.strip().split(":")[0].lower(), h.strip()) for h in raw_header]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InputError(path, f"duplicate column {sorted(dup)[0]!r} in header",
                             line=header_line)
    else:
        names = header
    if not len(lines):
        raise InputError(path, "no data rows")
    n_sep = np.strings.count(lines, delimiter)
    bad = np.flatnonzero(n_sep != len(names) - 1)
    if len(bad):
        row = int(bad[0])
        sep = "tab" if delimiter == "\t" else repr(delimiter)
        raise InputError(path, f"expected {len(names)} {sep}-separated fields "
                               f"({', '.join(names)}), found {int(n_sep[row]) + 1}",
                         line=int(line_no[row]))
    cells = np.array(delimiter.join(lines.tolist()).split(delimiter)).reshape(len(lines), len(names))
    cells = np.strings.strip(cells)
    values = {name: cells[:, j] for j, name in enumerate(names)}
    return Table(path, names, values, line_no)

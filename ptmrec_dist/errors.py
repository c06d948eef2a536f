"""Error types that the CLI turns into exit codes, and the counted-skip report.

Bad input is exit 2 with ``file:line: what is wrong``; nothing is dropped silently: a user who
chose ``on_bad_sample: skip`` gets a :class:`SkipReport` with counts and the first few ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path


class PtmrecError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(PtmrecError):
    """Bad user input (a data file, a catalog, a shard). Message: ``file:line: field: what``.

    ``InputError("whole message")`` also works (and pickles), so that the error survives the trip
    from a DataLoader worker process, which rebuilds exceptions from their message.
    """

    exit_code = 2

    def __init__(self, path: str | Path | None, message: str | None = None,
                 line: int | None = None, field: str | None = None):
        if message is None:          # rebuilt from a formatted message
            self.path, self.line, self.field = None, None, None
            super().__init__(str(path))
            return
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        where = self.path or "<input>"
        if line is not None:
            where += f":{line}"
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")

    def __reduce__(self):
        return type(self), (str(self),)


class ConfigError(PtmrecError):
    """Unknown key, wrong type or invalid value in the configuration (names the key)."""

    exit_code = 2


class TrainingError(PtmrecError):
    """Training cannot go on (a non-finite loss); the message says what to change."""

    exit_code = 1


class ShardError(InputError):
    """A shard is missing, truncated, corrupt, or does not match its manifest."""


@dataclass
class SkipReport:
    """Counts of skipped samples by reason, with the first few ids of each (for people)."""

    max_ids: int = 5
    counts: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    first_ids: "dict[str, list]" = field(default_factory=dict)

    def add(self, reason: str, item_id) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ids = self.first_ids.setdefault(reason, [])
        if len(ids) < self.max_ids:
            ids.append(item_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total,
                "by_reason": {r: {"count": c, "first_ids": self.first_ids[r]}
                              for r, c in self.counts.items()}}

    def message(self, what: str = "items") -> str:
        if not self.total:
            return f"skipped 0 {what}"
        parts = [f"{c} {r} (first: {', '.join(map(str, self.first_ids[r]))})"
                 for r, c in self.counts.items()]
        return f"skipped {self.total} {what}: " + "; ".join(parts)


class Interrupted(PtmrecError):
    """A stop signal (SIGTERM/SIGUSR1) was handled: a checkpoint was written and the run
    stopped; ``--resume`` continues it. Exit code 3 (so that dependent jobs do not start)."""

    exit_code = 3

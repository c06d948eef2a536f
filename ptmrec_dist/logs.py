"""Messages and progress bars: the package's loggers, ``setup_logging`` (the CLI's), ``progress``.

Every module logs through ``get_logger(__name__)``: a logger of the ``ptmrec_dist`` hierarchy
(``logging.getLogger("ptmrec_dist.train.stage1")``, ...). Functions that take a ``log``
callable (``run_stage1``, ``run_extract``, ``run_demo``, ...) default to their module logger's
``info``; callers may still pass their own callable (tests, ``ptmrec tune``'s per-trial file).

Who configures what:

* ``ptmrec`` (:func:`ptmrec_dist.cli.main`) calls :func:`setup_logging` once: one handler on the
  ``ptmrec_dist`` logger writing to stderr, the plain message for INFO, ``warning: ...`` and
  ``error: ...`` for WARNING and ERROR; ``-q`` keeps warnings and errors only (and turns the
  progress bars off), ``-v`` adds DEBUG and puts the time and the logger name before every line.
* The library configures nothing (importing ``ptmrec_dist`` adds no handler). Used from Python:
  once the application has configured logging (a handler on the root logger or on a
  ``ptmrec_dist`` logger, e.g. ``logging.basicConfig(level=logging.INFO)``), messages go through
  that configuration like any library's. Before that, so that ``run_stage1(...)`` in a script
  or a notebook still shows its epochs as it always did, messages at INFO and above (or at the
  level set on a ``ptmrec_dist`` logger) are written to stderr in the CLI's format; pytest's
  capture handlers do not count as a configuration, so tests see what a script sees.

Results (``ptmrec evaluate``'s table, ``--json`` outputs, ``ptmrec recommend``'s JSON lines,
summary lines) are not log messages: commands print them to stdout, whatever the verbosity.

:func:`progress` is a tqdm bar on stderr on the main rank only, shown when stderr is a terminal
and not under ``-q``; ``PTMREC_PROGRESS=1`` forces bars on where stderr is not a terminal (e.g.
a batch job's log; still the main rank only, and never under ``-q``), ``PTMREC_PROGRESS=0``
off. A bar only counts: it never changes a result or a file.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "ptmrec_dist"
PROGRESS_ENV = "PTMREC_PROGRESS"

_quiet = False          # set by setup_logging(-1): no bars


def _prefix(level: int) -> str:
    if level >= logging.ERROR:
        return "error: "
    if level >= logging.WARNING:
        return "warning: "
    return "" if level >= logging.INFO else "debug: "


class Formatter(logging.Formatter):
    """``message`` / ``warning: message`` / ``error: message`` (``debug: message``); verbose:
    the time and the logger name first."""

    def __init__(self, verbose: bool = False):
        super().__init__("%(asctime)s %(name)s: %(message)s" if verbose else "%(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = _prefix(record.levelno) + message
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (a redirected or captured stderr
    included), like :data:`logging.lastResort`."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if _BAR is not None and getattr(_BAR, "_instances", None):   # a bar shows: log above it
            with _BAR.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)


_FALLBACK = StderrHandler()
_FALLBACK.setFormatter(Formatter())


def _configured(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` reaches a handler someone installed (pytest's capture
    handlers aside)."""
    node: logging.Logger | None = logger
    while node is not None:
        if any(not type(h).__module__.startswith("_pytest") for h in node.handlers):
            return True
        if not node.propagate:
            return False
        node = node.parent
    return False


def _fallback_level(logger: logging.Logger) -> int:
    """The level set on ``logger`` or a ``ptmrec_dist`` logger above it; INFO if none is."""
    node: logging.Logger | None = logger
    while node is not None and (node.name == ROOT or node.name.startswith(ROOT + ".")):
        if node.level != logging.NOTSET:
            return node.level
        node = node.parent
    return logging.INFO


class PackageLogger(logging.LoggerAdapter):
    """``logging.getLogger(name)`` with the unconfigured fallback of the module doc: its
    ``info``/``warning``/... go through logging once it is configured, else to stderr."""

    def __init__(self, name: str):
        super().__init__(logging.getLogger(name), {})

    def log(self, level, msg, *args, **kwargs):
        if _configured(self.logger):
            super().log(level, msg, *args, **kwargs)
        elif level >= _fallback_level(self.logger):
            exc_info = kwargs.get("exc_info")
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            elif exc_info and not isinstance(exc_info, tuple):
                exc_info = sys.exc_info()
            record = self.logger.makeRecord(self.logger.name, level, "(unknown file)", 0, msg,
                                            args, exc_info or None, extra=kwargs.get("extra"))
            _FALLBACK.handle(record)


def get_logger(name: str) -> PackageLogger:
    """The logger of module ``name`` (``get_logger(__name__)``)."""
    return PackageLogger(name)


def setup_logging(verbosity: int = 0) -> None:
    """The command line's logging: -1 (``--quiet``) warnings and errors only and no progress
    bars, 0 INFO, 1 (``--verbose``) DEBUG with times and logger names; to stderr. Calling it
    again replaces its own handler (``main()`` may run several times in one process)."""
    global _quiet
    pkg = logging.getLogger(ROOT)
    for handler in [h for h in pkg.handlers if getattr(h, "_ptmrec", False)]:
        pkg.removeHandler(handler)
    handler = StderrHandler()
    handler._ptmrec = True
    handler.setFormatter(Formatter(verbose=verbosity > 0))
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbosity > 0 else
                 logging.WARNING if verbosity < 0 else logging.INFO)
    pkg.propagate = False      # one line per message, whatever a dependency did to the root
    _quiet = verbosity < 0


def reset_logging() -> None:
    """Undo :func:`setup_logging` (tests)."""
    global _quiet
    pkg = logging.getLogger(ROOT)
    for handler in [h for h in pkg.handlers if getattr(h, "_ptmrec", False)]:
        pkg.removeHandler(handler)
    pkg.setLevel(logging.NOTSET)
    pkg.propagate = True
    _quiet = False


def _main_rank() -> bool:
    from ptmrec_dist import dist
    return dist.detect().is_main


def progress_enabled(main: bool | None = None) -> bool:
    """Whether a bar shows: never off the main rank (``main``; None: from the launcher's
    variables) or under ``--quiet``; else ``PTMREC_PROGRESS=1``/``0`` forces it on/off, and
    without it a bar shows where stderr is a terminal."""
    if _quiet or not (_main_rank() if main is None else main):
        return False
    force = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if force in ("1", "true", "yes", "on"):
        return True
    if force in ("0", "false", "no", "off"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


_BAR = None


def _bar_class():
    global _BAR
    if _BAR is None:
        from tqdm import tqdm

        class Bar(tqdm):
            monitor_interval = 0     # no monitor thread (forks for loader workers stay clean)
        _BAR = Bar
    return _BAR


def progress(iterable=None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", leave: bool = True, main: bool | None = None,
             enabled: bool = True, **kwargs):
    """A tqdm bar on stderr where :func:`progress_enabled` (and the caller, ``enabled``) say
    so, else a disabled one: the same object either way (``update``, ``close``, iteration,
    ``with``), and iterating it yields ``iterable`` unchanged."""
    show = enabled and progress_enabled(main)
    return _bar_class()(iterable, total=total, desc=desc, unit=unit, leave=leave,
                        file=sys.stderr, disable=not show, dynamic_ncols=True, **kwargs)

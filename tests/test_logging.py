"""Messages, results and progress bars (``ptmrec_dist/logs.py``): -q/-v, stdout vs stderr,
the library's behaviour without any logging set-up, and when a progress bar shows."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ptmrec_dist import logs
from ptmrec_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch):
    """Every test starts and ends without the CLI's set-up and without PTMREC_PROGRESS."""
    monkeypatch.delenv(logs.PROGRESS_ENV, raising=False)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    logs.reset_logging()
    yield
    logs.reset_logging()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def write_inter(path: Path) -> Path:
    """12 users x 15 items, MMRec ``.inter`` with train/valid/test labels."""
    rows = ["userID\titemID\tx_label"]
    for u in range(12):
        for k in range(6):
            rows.append(f"{u}\t{(u * 3 + k) % 15}\t{0 if k < 4 else 1 if k == 4 else 2}")
    path.write_text("\n".join(rows) + "\n")
    return path


def run_cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != logs.PROGRESS_ENV}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ptmrec_dist", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


# ------------------------------------------------------------------------ the command line

def test_quiet_drops_info_lines_and_bars_and_keeps_the_run_the_same(tmp_path):
    """``ptmrec stage1`` (the popularity model: no training, seconds): INFO lines and, with
    PTMREC_PROGRESS=1, the evaluation bar on stderr; ``-q`` (before or after the subcommand)
    leaves stderr empty even with the bar forced; nothing on stdout either way; same metrics."""
    data = write_inter(tmp_path / "d.inter")
    args = ["--data", data, "--model", "pop"]
    loud = run_cli("stage1", *args, "--out", tmp_path / "loud",
                   env_extra={logs.PROGRESS_ENV: "1"})
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout == ""
    assert "stage 1: pop on 12 users x 15 items" in loud.stderr
    assert "runtime: device cpu" in loud.stderr
    assert "evaluate:" in loud.stderr and "user/s" in loud.stderr       # the bar
    for quiet in (["-q", "stage1", *args], ["stage1", *args, "--quiet"]):
        out = tmp_path / f"quiet{len(quiet[0])}"
        proc = run_cli(*quiet, "--out", out, env_extra={logs.PROGRESS_ENV: "1"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr == ""
        a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "loud", out))
        assert (a["valid"], a["test"]) == (b["valid"], b["test"])


def test_errors_still_show_under_quiet(tmp_path, capsys):
    assert main(["-q", "stats", str(tmp_path / "missing.inter")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {tmp_path / 'missing.inter'}")


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_debug_with_logger_name(where, capsys):
    argv = ["-v", "config"] if where == "before" else ["config", "--verbose"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ptmrec_dist.cli: debug: ptmrec_dist " in err
    assert main(["config"]) == 0                         # without -v: no debug line
    assert "debug:" not in capsys.readouterr().err


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "config", "-v"])
    assert exc.value.code == 2
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["config", "seed=7"], ["stats", "{inter}", "--json"],
                                  ["stats", "{inter}"]])
def test_results_on_stdout_are_the_same_under_quiet_and_verbose(argv, tmp_path, capsys):
    inter = str(write_inter(tmp_path / "d.inter"))
    argv = [a.replace("{inter}", inter) for a in argv]
    outputs = {}
    for flags in ([], ["-q"], ["-v"]):
        assert main([*flags, *argv]) == 0
        captured = capsys.readouterr()
        outputs[tuple(flags)] = captured.out
        if flags == ["-q"]:
            assert captured.err == ""
    assert outputs[()] == outputs[("-q",)] == outputs[("-v",)]
    assert outputs[()].strip()
    if "--json" in argv:
        assert json.loads(outputs[()])["users"] == 12
    if argv[0] == "config":
        assert "seed: 7" in outputs[()]


def test_help_lists_the_global_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--quiet" in out and "--verbose" in out


# ------------------------------------------------------------------------ log format

def test_setup_logging_formats_and_levels(capsys):
    log = logs.get_logger("ptmrec_dist.some.module")
    logs.setup_logging(0)
    log.debug("hidden")
    log.info("plain %s", "info")
    log.warning("careful")
    log.error("broken")
    assert capsys.readouterr().err == "plain info\nwarning: careful\nerror: broken\n"
    logs.setup_logging(-1)
    log.info("hidden too")
    log.warning("still here")
    assert capsys.readouterr().err == "warning: still here\n"
    logs.setup_logging(1)
    log.debug("now shown")
    err = capsys.readouterr().err
    assert err.rstrip().endswith("ptmrec_dist.some.module: debug: now shown")
    assert err[:4].isdigit()                                # a timestamp first


def test_without_setup_info_and_warnings_reach_stderr(capsys):
    """No logging configured (pytest's capture handlers aside): what ``run_stage1`` and
    friends say is still written to stderr, at INFO and above."""
    log = logs.get_logger("ptmrec_dist.train.stage1")
    log.debug("not shown")
    log.info("epoch 0 done")
    log.warning("odd")
    assert capsys.readouterr().err == "epoch 0 done\nwarning: odd\n"


def test_an_application_handler_takes_the_messages_instead(capsys):
    """Once the application configures logging, messages go there only (no second copy)."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    pkg = logging.getLogger("ptmrec_dist")
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    try:
        logs.get_logger("ptmrec_dist.demo").info("step 1")
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(logging.NOTSET)
    assert sink.getvalue() == "step 1\n"
    assert capsys.readouterr().err == ""


def test_default_log_callables_are_logger_methods():
    import inspect

    from ptmrec_dist.clip.extract import run_extract
    from ptmrec_dist.demo import run_demo
    from ptmrec_dist.train.stage1 import run_stage1
    from ptmrec_dist.train.stage2 import run_stage2
    for fn in (run_extract, run_demo, run_stage1, run_stage2):
        assert inspect.signature(fn).parameters["log"].default is None, fn   # -> logger.info


# ------------------------------------------------------------------------ warnings

def _short_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        data = b'{"index": 0, "item_id": 0}'
        info = tarfile.TarInfo("000000000.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("setup", [None, 0, -1])
def test_reader_warnings_reach_stderr_with_their_text(setup, tmp_path, capsys):
    from ptmrec_dist.data.readers import iter_shard
    if setup is not None:
        logs.setup_logging(setup)
    path = _short_tar(tmp_path / "items-000000.tar")
    assert len(list(iter_shard(path, "skip", n_items=5))) == 1
    assert capsys.readouterr().err == f"warning: {path}: truncated shard, 1 of 5 items read\n"
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    assert list(iter_shard(tmp_path / "bad.tar", "skip")) == []
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / 'bad.tar'}: unreadable tar, rest of shard "
                          "skipped (")


# ------------------------------------------------------------------------ progress bars

def test_progress_is_off_when_stderr_is_not_a_terminal(capsys):
    assert not logs.progress_enabled(main=True)
    bar = logs.progress(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_main_rank_only_and_not_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert logs.progress_enabled(main=True)
    assert not logs.progress_enabled(main=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not logs.progress_enabled()                   # rank from the launcher's variables
    monkeypatch.setenv("RANK", "0")
    assert logs.progress_enabled()
    monkeypatch.setenv(logs.PROGRESS_ENV, "0")
    assert not logs.progress_enabled(main=True)          # forced off
    monkeypatch.delenv(logs.PROGRESS_ENV)
    logs.setup_logging(-1)
    assert not logs.progress_enabled(main=True)          # --quiet
    monkeypatch.setenv(logs.PROGRESS_ENV, "1")
    assert not logs.progress_enabled(main=True)          # --quiet wins over the variable


def test_progress_forced_on_writes_a_bar_and_yields_the_same_items(monkeypatch, capsys):
    monkeypatch.setenv(logs.PROGRESS_ENV, "1")
    assert logs.progress_enabled(main=True)
    assert not logs.progress_enabled(main=False)         # never off the main rank
    assert logs.progress(range(3), main=False).disable
    bar = logs.progress(range(5), desc="counting", unit="thing", main=True)
    assert not bar.disable
    assert list(bar) == list(range(5))
    err = capsys.readouterr().err
    assert "counting" in err and "5/5" in err
    assert logs.progress(range(2), main=True, enabled=False).disable   # the caller's no


def test_shard_bar_changes_no_file(tmp_path, make_catalog, monkeypatch, capsys):
    """The same catalog sharded with and without the bar: the same tars, byte for byte."""
    from ptmrec_dist.data.shards import write_shards
    cat = make_catalog(tmp_path, n_items=12)

    def digests(out: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.glob("items-*.tar"))}

    write_shards(cat, tmp_path / "plain", shard_size=5, workers=1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(logs.PROGRESS_ENV, "1")
    write_shards(cat, tmp_path / "bar", shard_size=5, workers=1)
    err = capsys.readouterr().err
    assert "shard:" in err and "12/12" in err
    assert digests(tmp_path / "plain") == digests(tmp_path / "bar") != {}

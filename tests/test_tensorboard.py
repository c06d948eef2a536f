"""``log.tensorboard: true``: each epoch record of ``log.jsonl`` also as TensorBoard scalars in
``OUT/tensorboard/`` (tag: key path, step: epoch); off by default (no folder)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset
from run_fixtures import read_log

from ptmrec_dist.config import load_config
from ptmrec_dist.run import RunDir, scalars
from ptmrec_dist.train.stage1 import run_stage1

QUICK = ["recommender.name=bpr", "stage1.epochs=3", "stage1.batch_size=64", "stage1.lr=0.01"]


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under ``folder`` (TFRecord framing: length,
    its crc, the serialized Event, its crc), in file order, as TensorBoard reads them: a
    session START at step S (a resumed run) drops the values of steps >= S written before."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:   # START
                for steps in out.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tb") / "tiny")


def run(data, out, *overrides):
    cfg = load_config(None, [f"data.path={data}", *QUICK, *overrides])
    return run_stage1(cfg, out, log=lambda *_: None)


def test_stage1_writes_every_numeric_log_field_per_epoch(data, in_process, tmp_path):
    run(data, tmp_path, "log.tensorboard=true")
    records = read_log(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    got = read_scalars(tmp_path / "tensorboard")
    assert "valid/recall@20" in got and "loss" in got
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        for tag, value in scalars({k: v for k, v in r.items() if k != "epoch"}).items():
            expected.setdefault(tag, {})[r["epoch"]] = value
    assert set(got) == set(expected)
    for tag, steps in expected.items():
        assert got[tag] == pytest.approx(steps, rel=1e-6), tag    # float32 in the event file


def test_off_by_default_no_folder(data, in_process, tmp_path):
    run(data, tmp_path)
    assert (tmp_path / "log.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def test_scalars_and_rundir_lifecycle(tmp_path):
    assert scalars({"epoch": 1, "loss": 0.5, "best": True, "valid": {"recall@20": 0.25},
                    "gate": [0.1], "name": "x"}) == {"epoch": 1.0, "loss": 0.5,
                                                    "valid/recall@20": 0.25}
    cfg = load_config(None, ["log.tensorboard=true"])
    rd = RunDir(tmp_path, cfg).start()
    rd.log(step="data")                       # no epoch: log.jsonl only
    rd.log(epoch=0, loss=2.0)
    rd.log(epoch=1, loss=1.0)
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {0: 2.0, 1: 1.0}  # flushed already
    # resumed after epoch 0: the earlier run's epoch 1 is purged (its log line was dropped)
    rd2 = RunDir(tmp_path, cfg).start(resume_lines=2)
    rd2.log(epoch=1, loss=0.75)
    rd2.write_metrics({})
    assert rd2._tb is None
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {0: 2.0, 1: 0.75}
    rd3 = RunDir(tmp_path, cfg).start(resume_lines=2)    # resumed again; killed before epoch 1
    rd3.close()
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {0: 2.0, 1: 0.75}
    rd4 = RunDir(tmp_path, cfg).start(resume_lines=1)    # and again, from epoch 0's checkpoint
    rd4.log(epoch=1, loss=0.5)
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {0: 2.0, 1: 0.5}
    rd4.close()
    # a fresh run in the same folder keeps the earlier events as tensorboard.1, like log.jsonl.1
    RunDir(tmp_path, cfg).start().log(epoch=0, loss=9.0)
    assert read_scalars(tmp_path / "tensorboard")["loss"] == {0: 9.0}
    assert (tmp_path / "tensorboard.1").is_dir() and (tmp_path / "log.jsonl.1").is_file()

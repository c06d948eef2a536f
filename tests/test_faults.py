"""Checkpoints under faults (issue 19): a non-finite loss never reaches a checkpoint; a damaged
newest checkpoint falls back to the one before (exit 2 when none is left) and replacing or
rotating never leaves no complete one; nothing is unpickled (rank files are safetensors +
JSON, DeepSpeed's files load with ``weights_only=True``, format-1 checkpoints still resume, the
backbone loads from safetensors only); a full disk on one rank stops every rank promptly with
the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rec_fixtures import in_process  # noqa: F401  (a fixture)
from rec_fixtures import make_tiny_dataset
from run_fixtures import assert_same_run, child_env, read_log

from demo_fixtures import stage2_cfg
from ptmrec_dist.config import load_config
from ptmrec_dist.errors import InputError, TrainingError
from ptmrec_dist.train.checkpoint import checkpoint_dirs

QUICK = ["stage1.batch_size=64", "stage1.lr=0.01", "recommender.name=bpr"]


def _quiet(*_):
    pass


def stage1(data, out, *overrides, resume=False, log=_quiet):
    from ptmrec_dist.train.stage1 import run_stage1
    cfg = load_config(None, [f"data.path={data}", *QUICK, *overrides])
    return run_stage1(cfg, out, log=log, resume=resume)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("faults") / "tiny")


def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def assert_finite_checkpoint(path: Path) -> None:
    """Every floating tensor of DeepSpeed's files in the checkpoint ``path`` is finite."""
    files = sorted(path.glob("*.pt"))
    assert files, path
    for f in files:
        for t in tensors_in(torch.load(f, map_location="cpu", weights_only=False)):
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{f} holds non-finite values"


# ---------------------------------------------------------------------------- a tiny engine

def tiny_engine(seed: int = 0):
    """A DeepSpeed engine (ZeRO-2: a file per rank) over a Linear layer, one step done;
    the process group of this process (one rank, or the one already set up)."""
    from ptmrec_dist import dist
    from ptmrec_dist.train.engine import build_engine, stage_ds_config

    env = dist.init("gloo", 120)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 2)
    cfg = load_config(None, ["stage1.batch_size=2", "stage1.ds_config=zero2"])
    engine = build_engine(layer, stage_ds_config(cfg.stage1, env.world_size, "stage1",
                                                 trainable=10))
    x = torch.randn(2 // env.world_size, 4)
    engine.backward(engine(x).pow(2).sum())
    engine.step()
    return env, engine


# ---------------------------------------------------------------------------- case 1: NaN


@pytest.mark.parametrize("ds_config", ["zero0", "zero2"])
def test_stage2_nan_loss_stops_before_a_mid_epoch_checkpoint(demo, tmp_path, monkeypatch,
                                                             ds_config):
    """Case 1 (stage 2): the loss turns NaN at micro step 3 with a checkpoint due every
    optimizer step. Before issue 19 the loss was checked at the epoch's end only: every step's
    checkpoint was written, with NaN weights under ZeRO-0 (ZeRO-1/2 skip a step whose gradients
    are not finite, so their weights stayed finite, but the checkpoints carried the NaN loss
    sums). Now the run stops at step 3, naming it, and the checkpoints on disk are those of
    steps 1 and 2, with finite weights."""
    from ptmrec_dist.train.stage2 import run_stage2
    from ptmrec_dist.train.stage2_model import Stage2Model

    forward, calls = Stage2Model.forward, []

    def poisoned(self, batch):
        losses, features = forward(self, batch)
        calls.append(1)
        if len(calls) >= 3:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses, features

    monkeypatch.setattr(Stage2Model, "forward", poisoned)
    out, _ = demo
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"epoch 0, micro step 3 \(optimizer step 3\)"):
        run_stage2(stage2_cfg(out, "stage2.epochs=1", "stage2.checkpoint_every=1",
                              "stage2.keep_checkpoints=50", f"stage2.ds_config={ds_config}"),
                   run, log=_quiet)
    saved = checkpoint_dirs(run / "checkpoints")
    assert [p.name for p in saved] == ["step-00000001", "step-00000002"]
    for path in saved:
        assert_finite_checkpoint(path)


def test_stage1_overflowed_weights_never_reach_a_checkpoint(data, in_process, tmp_path,
                                                            monkeypatch):
    """Case 1 (stage 1): the last update of epoch 1 overflows a weight (its loss, computed
    before the update, is finite; simulated by setting the weight to inf after the epoch). The
    epoch's loss check passes, so before issue 19 the epoch-end checkpoint held the inf weight;
    now the run stops there, naming the epoch and optimizer step, and the checkpoints on disk
    (epoch 0's) hold finite weights only. (A NaN loss itself stopped stage 1 before any
    checkpoint already: it checkpoints at epoch ends, after the loss check.)"""
    from ptmrec_dist.train.stage1 import Stage1Run

    train_epoch = Stage1Run.train_epoch

    def overflowing(self, epoch):
        record = train_epoch(self, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(p for p in self.engine.module.parameters() if p.requires_grad)[0] = \
                    float("inf")
        return record

    monkeypatch.setattr(Stage1Run, "train_epoch", overflowing)
    with pytest.raises(TrainingError, match=r"stage 1: after epoch 1 \(optimizer step \d+\): "
                                            r"\d+ trainable weights are NaN or infinite"):
        stage1(data, tmp_path / "inf", "stage1.epochs=3", "stage1.checkpoint_every=1")
    saved = checkpoint_dirs(tmp_path / "inf" / "checkpoints")
    assert [json.loads((p / "state.json").read_text())["epoch"] for p in saved] == [0]
    assert_finite_checkpoint(saved[0])


# ---------------------------------------------------------------------------- case 2: damage

@pytest.fixture(scope="module")
def reference(data, in_process, tmp_path_factory):
    """An uninterrupted 4-epoch stage-1 run with a checkpoint after every epoch (those of
    epochs 2 and 3 kept)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    stage1(data, out, "stage1.epochs=4", "stage1.checkpoint_every=1")
    return out


def cut_after(reference: Path, tmp_path: Path, epoch: int) -> Path:
    """A copy of ``reference`` as after a kill right after epoch ``epoch``'s checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "metrics.json").unlink()
    for path in checkpoint_dirs(run / "checkpoints"):
        if json.loads((path / "state.json").read_text())["epoch"] > epoch:
            shutil.rmtree(path)
    return run


@pytest.mark.parametrize("damage", ["truncated", "state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
        data, reference, in_process, tmp_path, caplog, damage):
    """Case 2: the newest checkpoint has a truncated DeepSpeed file (as after a crash before its
    data reached the disk) or a corrupt ``state.json``. Before issue 19: a traceback from the
    unpickler / the JSON parser. Now: a warning naming it, and the run resumes from the one
    before, to exactly the uninterrupted run's result."""
    run = cut_after(reference, tmp_path, 3)
    before, newest = checkpoint_dirs(run / "checkpoints")[-2:]
    if damage == "truncated":
        victim = newest / "mp_rank_00_model_states.pt"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        (newest / "state.json").write_text('{"epoch": 2, "wor')
    said: list[str] = []
    with caplog.at_level("WARNING"):
        stage1(data, run, "stage1.epochs=4", "stage1.checkpoint_every=1", resume=True,
               log=said.append)
    assert any(str(newest) in r.getMessage() and str(before) in r.getMessage()
               for r in caplog.records), caplog.text
    assert any(f"resumed from {before}" in m for m in said), said
    assert_same_run(reference, run)
    from ptmrec_dist.train.checkpoint import problem     # the damaged one was replaced
    assert [problem(p) for p in checkpoint_dirs(run / "checkpoints")] == [None, None]


def test_a_damaged_only_checkpoint_exits_2_naming_it(data, reference, in_process, tmp_path,
                                                       capsys):
    """Case 2: the only checkpoint is damaged: exit 2 naming it (before: a traceback)."""
    from ptmrec_dist.cli import main

    run = cut_after(reference, tmp_path, 2)
    (only,) = checkpoint_dirs(run / "checkpoints")
    (only / "state.json").write_text("{not json")
    with pytest.raises(InputError, match="no earlier complete one") as err:
        stage1(data, run, "stage1.epochs=4", "stage1.checkpoint_every=1", resume=True)
    assert err.value.exit_code == 2 and str(only) in str(err.value)
    code = main(["stage1", "--out", str(run), "--data", str(data), "--model", "bpr",
                 "stage1.batch_size=64", "stage1.lr=0.01", "stage1.epochs=4",
                 "stage1.checkpoint_every=1", "--resume"])
    assert code == 2 and str(only) in capsys.readouterr().err


def test_replacing_a_checkpoint_never_leaves_none_and_everything_is_fsynced(
        in_process, tmp_path, monkeypatch):
    """Case 2: saving a step that has a checkpoint already (an epoch's end at the step of a
    mid-epoch checkpoint), with ``keep=1``: at every rename or removal there is a complete
    checkpoint to resume from (before issue 19 the old one was removed first). Every file of
    the checkpoint, its folder and the folder above are fsynced."""
    from ptmrec_dist.train import checkpoint as ck

    env, engine = tiny_engine()
    root = tmp_path / "checkpoints"
    saver = ck.Checkpointer(root, env, keep=1)
    saver.save(engine, 5, {"epoch": 0, "config": {}}, {})
    synced: list[str] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def guarded(op):
        def run(path, *args, **kwargs):
            assert ck.latest_checkpoint(root) is not None, f"no checkpoint left at {op} {path}"
            return {"replace": real_replace, "rmtree": real_rmtree}[op](path, *args, **kwargs)
        return run

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ck.os, "replace", guarded("replace"))
    monkeypatch.setattr(ck.shutil, "rmtree", guarded("rmtree"))
    final = saver.save(engine, 5, {"epoch": 0, "epoch_done": True, "config": {}}, {})
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000005"]
    assert json.loads((final / "state.json").read_text())["epoch_done"]
    assert ck.latest_checkpoint(root) == final and sorted(root.glob(".*")) == []
    tmp = str(root / ".tmp-step-00000005")
    written = {p.name for p in final.iterdir()}
    # an atomic write fsyncs its temp file (".NAME.XXXX.tmp") before the rename
    names = {Path(s).name for s in synced if s.startswith(tmp + "/")}
    names |= {n[1:].rsplit(".", 2)[0] for n in names if n.startswith(".") and n.endswith(".tmp")}
    assert written <= names, (written, synced)
    assert tmp in synced and str(root) in synced


# ---------------------------------------------------------------------------- case 3: pickles

class Payload:
    """Unpickling this runs ``open(marker, "w")``: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_checkpoint_runs_no_code(in_process, tmp_path):
    """Case 3: a ``rank0.pt`` (the format-1 rank file) or a DeepSpeed file replaced by a pickle
    whose ``__reduce__`` would create a file. Before issue 19 ``torch.load(weights_only=False)``
    ran it; now the checkpoint is refused (exit 2) and nothing runs."""
    from ptmrec_dist.train.checkpoint import Checkpointer

    env, engine = tiny_engine()
    saver = Checkpointer(tmp_path / "checkpoints", env, keep=5)
    for step, victim in enumerate(("rank0.pt", "mp_rank_00_model_states.pt"), start=1):
        path = saver.save(engine, step, {"epoch": 0, "config": {}}, {})
        marker = tmp_path / f"ran-{victim}"
        if victim == "rank0.pt":                  # as format 1 wrote it: no safetensors file
            (path / "rank0.safetensors").unlink(missing_ok=True)
        torch.save({"rng": Payload(marker)}, path / victim)
        with pytest.raises(InputError, match="nothing in it ran") as err:
            saver.load(engine, path)
        assert err.value.exit_code == 2 and victim in str(err.value)
        assert not marker.exists()


def test_rank_files_are_safetensors_and_restore_the_rng_states(in_process, tmp_path):
    """Case 3: the per-rank state (RNG states, the trainer's tensors and numbers) is a
    safetensors file with JSON metadata, no pickle; loading it restores python's, numpy's and
    torch's RNG streams exactly."""
    import random

    from safetensors import safe_open

    from ptmrec_dist.train.checkpoint import Checkpointer

    env, engine = tiny_engine()
    saver = Checkpointer(tmp_path / "checkpoints", env)
    random.random(), np.random.normal(), torch.rand(1)        # noqa: B018 (move the streams)
    rank_state = {"sums": {"loss": torch.tensor(1.5)}, "items_seen": 7,
                  "written": {"items": torch.zeros(0, dtype=torch.long),
                              "values": {"text": torch.ones(0, 3)}}}
    path = saver.save(engine, 1, {"epoch": 0, "config": {}}, rank_state)
    assert not list(path.glob("rank*.pt"))
    with safe_open(str(path / "rank0.safetensors"), "pt") as f:
        assert "ptmrec" in f.metadata()
    expected = (random.random(), np.random.normal(), torch.rand(1))
    random.random(), np.random.normal(), torch.rand(1)        # noqa: B018
    restored = saver.load(engine, path)
    assert (random.random(), np.random.normal(), torch.rand(1)) == expected
    assert restored["items_seen"] == 7 and float(restored["sums"]["loss"]) == 1.5
    assert restored["written"]["values"]["text"].shape == (0, 3)


def to_format1(path: Path) -> None:
    """Rewrite the checkpoint ``path`` as the previous format wrote it: ``rank<R>.pt``
    (torch.save of the RNG states as tuples and the rank state), no manifest."""
    from ptmrec_dist.train.checkpoint import read_rank_state

    state = read_rank_state(path, 0)
    py, npy = state["rng"]["python"], state["rng"]["numpy"]
    state["rng"]["python"] = (py["version"], tuple(py["state"]), py["gauss_next"])
    state["rng"]["numpy"] = (npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32),
                             npy["pos"], npy["has_gauss"], npy["gauss"])
    torch.save(state, path / "rank0.pt")
    (path / "rank0.safetensors").unlink()
    (path / "manifest.json").unlink()
    saved = json.loads((path / "state.json").read_text())
    saved.pop("format")
    (path / "state.json").write_text(json.dumps(saved))


def test_a_checkpoint_of_the_previous_format_still_resumes(data, reference, in_process,
                                                           tmp_path):
    """Case 3: a checkpoint written by the previous format (``rank0.pt`` pickles, no manifest)
    resumes, read with ``weights_only=True``, to exactly the uninterrupted run's result."""
    run = cut_after(reference, tmp_path, 2)
    to_format1(checkpoint_dirs(run / "checkpoints")[-1])
    stage1(data, run, "stage1.epochs=4", "stage1.checkpoint_every=1", resume=True)
    assert_same_run(reference, run)
    assert [r["epoch"] for r in read_log(run)] == [0, 1, 2, 3]


def test_the_backbone_loads_from_safetensors_only(tmp_path):
    """Case 3: a backbone folder with only ``pytorch_model.bin`` (a pickle) is refused with exit
    2 and a message saying why, instead of being unpickled."""
    from transformers import CLIPConfig, CLIPModel

    from ptmrec_dist.clip.backbone import load_backbone

    tiny = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "vocab_size": 50},
                      vision_config={"hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "image_size": 8, "patch_size": 4},
                      projection_dim=8)
    folder = tmp_path / "pickled"
    model = CLIPModel(tiny)
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    cfg = load_config(None, [f"backbone.name_or_path={folder}"])
    with pytest.raises(InputError, match="safetensors") as err:
        load_backbone(cfg.backbone)
    assert err.value.exit_code == 2 and str(folder) in str(err.value)


# ---------------------------------------------------------------------------- case 4: full disk

def _save_with_a_full_disk_on_rank_1(rank: int, port: int, root: str, results, done) -> None:
    """One of 2 spawned ranks: a checkpoint at step 1, then one at step 2 whose DeepSpeed file
    write fails on rank 1 with ENOSPC (torch.save, patched in this process only). Each rank
    stays alive until ``done`` (a rank that ends closes its gloo sockets, which its peer notices
    at once; NCCL, or a rank still running, gives no such hint)."""
    import errno

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "2", "DS_ACCELERATOR": "cpu",
                       "OMP_NUM_THREADS": "1"})
    from ptmrec_dist import dist
    from ptmrec_dist.train.checkpoint import Checkpointer

    try:
        env, engine = tiny_engine()
        saver = Checkpointer(Path(root), env)
        saver.save(engine, 1, {"epoch": 0, "config": {}}, {})
        if rank == 1:
            def full(*_, **__):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            torch.save = full
        t0 = time.time()
        try:
            saver.save(engine, 2, {"epoch": 1, "config": {}}, {})
            outcome = "saved"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        results.put((rank, outcome, time.time() - t0))
    except BaseException as exc:
        results.put((rank, f"setup failed: {type(exc).__name__}: {exc}", 0.0))
    done.wait(timeout=300)
    dist.teardown()


def test_a_full_disk_on_one_rank_stops_both_ranks_promptly(tmp_path):
    """Case 4 (2 ranks, in-process failure): rank 1's write of its DeepSpeed file fails with
    ENOSPC while both processes live on. Before issue 19 rank 0 waited at DeepSpeed's closing
    barrier until the process group's timeout (120 s here, dist.timeout_s = 30 min by default);
    now both ranks agree on the failure and raise
    CheckpointWriteError within seconds, naming the folder and the disk; the step-1 checkpoint
    is intact and nothing of step 2 is left."""
    import multiprocessing as mp

    from ptmrec_dist.dist import free_port
    from ptmrec_dist.train.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_save_with_a_full_disk_on_rank_1,
                         args=(r, port, str(root), results, done)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in procs:
            rank, outcome, seconds = results.get(timeout=240)
            got[rank] = (outcome, seconds)
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, (outcome, seconds) in sorted(got.items()):
        assert outcome.startswith("CheckpointWriteError"), got
        assert outcome.startswith("CheckpointWriteError"), (rank, outcome)
        assert seconds < 30, (rank, seconds)
        assert str(root) in outcome and "MiB free" in outcome and "step-00000001" in outcome
    assert "No space left on device" in got[1][0] and "rank(s) 1" in got[0][0]
    assert latest_checkpoint(root) == root / "step-00000001"
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["step-00000001"]


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/run/checkpoints`` on a 1200 KiB tmpfs (root only): room for the backbone
    export and the first checkpoint of a 2-rank demo run, not for the second."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_under_two_real_ranks_ends_both_with_the_message(demo, small_disk):
    """Case 4 (2 ranks, a real full disk): ``OUT/checkpoints`` is a 1200 KiB tmpfs, so the
    second checkpoint of a 2-rank stage-2 run cannot be written. The ranks run as two
    independent processes (as under srun: no torchrun to kill the survivor), with
    ``dist.timeout_s=60``: each exits on its own, with code 1 and a message naming the folder
    and the disk, the second within 30 s of the first (no wait at a barrier); the first
    checkpoint is intact and is what ``--resume`` would take."""
    from ptmrec_dist.dist import free_port
    from ptmrec_dist.train.checkpoint import latest_checkpoint, problem

    out, _ = demo
    run = small_disk.parent
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**child_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ptmrec_dist", "stage2", "--config",
             str(out / "stage2" / "config.yaml"), "--out", str(run), "stage2.epochs=1",
             "stage2.checkpoint_every=2", "stage2.keep_checkpoints=50", "dist.timeout_s=60"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    ended, texts = {}, {}
    deadline = time.time() + 300
    while len(ended) < 2 and time.time() < deadline:
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.1)
    for rank, proc in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
        texts[rank] = proc.communicate()[0]
    assert len(ended) == 2, texts
    assert abs(ended[0] - ended[1]) < 30, (ended, texts)
    kept = latest_checkpoint(small_disk)
    assert kept is not None and problem(kept) is None
    for rank, proc in enumerate(procs):
        assert proc.returncode == 1, texts[rank][-3000:]
        assert f"was not saved in {small_disk}" in texts[rank], texts[rank][-3000:]
        assert "MiB free" in texts[rank] and f"kept ({kept.name})" in texts[rank]
    assert sorted(p.name for p in small_disk.iterdir() if p.is_dir()) == ["best", kept.name]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_stage2_set_up_ends_with_exit_3(demo, in_process, tmp_path,
                                                       monkeypatch, sig):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) while stage 2 sets up (here: during epoch -1's
    re-extraction, the longest part of it): the run stops before its first step with
    :class:`Interrupted` (exit 3, which slurm/*.sh requeue on), not a bare 143/130."""
    import signal

    from ptmrec_dist.errors import Interrupted
    from ptmrec_dist.train import stage2

    real = stage2.Stage2Run.refresh_bank

    def refresh(self, first=False):
        os.kill(os.getpid(), getattr(signal, sig))
        return real(self, first)
    monkeypatch.setattr(stage2.Stage2Run, "refresh_bank", refresh)
    out, _ = demo
    with pytest.raises(Interrupted, match=f"stopped by {sig} during set-up, before the first "
                                          "step; no new checkpoint") as err:
        stage2.run_stage2(stage2_cfg(out, "stage2.epochs=1"), tmp_path / "run",
                          log=lambda *_: None)
    assert err.value.exit_code == 3
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
    assert signal.getsignal(getattr(signal, sig)) is not None        # handlers put back


def test_a_signal_during_stage1_set_up_stops_after_the_first_epoch(in_process, tmp_path,
                                                                  monkeypatch):
    """SIGUSR1 while stage 1 loads its data: the handler is already in place, so the run
    checkpoints after epoch 0 and exits 3 (before: the process died with the signal)."""
    import signal

    from ptmrec_dist.data import interactions
    from ptmrec_dist.errors import Interrupted
    from ptmrec_dist.train import stage1

    real = interactions.load_interactions

    def load(*a, **kw):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **kw)
    monkeypatch.setattr(stage1, "load_interactions", load)
    data = make_tiny_dataset(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", "recommender.name=bpr", "stage1.epochs=5",
                             "stage1.batch_size=64"])
    with pytest.raises(Interrupted, match="stopped by SIGUSR1 after epoch 0"):
        stage1.run_stage1(cfg, tmp_path / "run", log=lambda *_: None)
    assert list((tmp_path / "run").glob("checkpoints/step-*"))

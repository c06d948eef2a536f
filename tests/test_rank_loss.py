"""A rank lost mid-run (issue 19): SIGKILL of one of two ranks of a bare launch (what srun and
torchrun start, without their own clean-up): the survivor exits promptly, with one line that says
what happened instead of a DeepSpeed traceback. (torchrun's own tear-down of the other workers is
tested in test_stage2.py's SIGKILL resume; srun's is its ``--wait``, slurm/_common.sh.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rec_fixtures import make_tiny_dataset

from ptmrec_dist.dist import free_port


def test_sigkill_of_one_rank_ends_the_other_promptly_with_one_line(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_users=400, n_items=300, per_user=20)
    port, run = free_port(), tmp_path / "run"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ptmrec_dist", "stage1", "--model", "bpr", "--out", str(run),
             f"data.path={data}", "stage1.epochs=100000", "stage1.patience=100000",
             "stage1.batch_size=64", "dist.timeout_s=120"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 180
    while not ((run / "log.jsonl").is_file()
               and len((run / "log.jsonl").read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.3)
    t0 = time.time()
    procs[1].send_signal(signal.SIGKILL)
    out, _ = procs[0].communicate(timeout=110)          # well inside dist.timeout_s
    waited = time.time() - t0
    procs[1].wait()
    assert procs[0].returncode == 1, out[-3000:]
    assert waited < 60, waited
    assert "error: rank 0 of 2: a collective failed, most likely because another rank ended" \
        in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_keeps_its_checkpoints(
        tmp_path):
    """Two ``ptmrec stage1`` into one output folder: the second exits 2 naming the folder and
    the first (its pid); the first run goes on and finishes, its checkpoints untouched."""
    data = make_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "ptmrec_dist", "stage1", "--model", "bpr", "--out", str(run),
           f"data.path={data}", "stage1.batch_size=64", "stage1.checkpoint_every=1"]
    first = subprocess.Popen([*cmd, "stage1.epochs=6", "stage1.patience=100"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not list(run.glob("checkpoints/step-*")):
        assert time.time() < deadline and first.poll() is None, first.communicate()[0][-2000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)             # still running while the second one starts
    try:
        second = subprocess.run([*cmd, "stage1.epochs=1"], env=env, capture_output=True,
                                text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"{run}: in use by ptmrec stage1 (pid {first.pid}" in second.stderr, second.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert (run / "metrics.json").is_file() and list(run.glob("checkpoints/step-*"))
    assert not (run / ".lock").exists()


def test_sigkill_of_one_torchrun_worker_ends_the_run_promptly(tmp_path):
    """Under torchrun: SIGKILL of worker 1 alone; torchrun's agent ends the other worker and
    exits non-zero within seconds (no waiting for dist.timeout_s)."""
    from pathlib import Path

    data = make_tiny_dataset(tmp_path / "data", n_users=400, n_items=300, per_user=20)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "ptmrec_dist", "stage1", "--model", "bpr",
         "--out", str(run), f"data.path={data}", "stage1.epochs=100000",
         "stage1.patience=100000", "stage1.batch_size=64", "dist.timeout_s=300"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    deadline = time.time() + 180
    while not ((run / "log.jsonl").is_file()
               and len((run / "log.jsonl").read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-2000:]
        time.sleep(0.3)
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    rank1 = [int(p) for p in kids.stdout.split()
             if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    assert len(rank1) == 1, kids.stdout
    t0 = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60, out[-3000:]

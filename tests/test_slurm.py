"""The sbatch scripts in ``slurm/`` against a real SLURM cluster on this machine (munge,
slurmctld and two slurmd, nodes n1 and n2: the ``slurm_cluster`` fixture): real ``sbatch``, real
jobs, real signals and requeues. A 2-node job (one task per node, gloo) must train exactly like
``torchrun`` with 2 processes; a job signalled with USR1 (SLURM's warning before the time
limit) or requeued by ``scontrol requeue`` (SIGTERM, as on preemption) must checkpoint, come
back, resume and finish with exactly the uninterrupted run's numbers; the pipeline must run its
stages in dependency order and cancel the later ones when one fails."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from run_fixtures import assert_same_run, checkpoint_states, job, job_env, ptmrec, sbatch

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
# 4 epochs, so that a signal sent after the first checkpoint arrives well before the end
RUN = ["stage2.epochs=4", "stage2.checkpoint_every=2", "stage2.keep_checkpoints=50",
       "stage2.stop_check_every=2"]      # the 2 ranks agree on a signal every 2 steps
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_for(job_id: int, timeout: float = 240) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job(job_id)
        if info["JobState"] in FINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)])
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job(job_id)}")


def stage2_job(demo_out: Path, run: Path, log: Path, *extra, wait: bool = False):
    return sbatch("--nodes", 2, "--ntasks-per-node", 1, "--output", log, SLURM / "stage2.sh",
                  "--config", demo_out / "stage2" / "config.yaml", "--out", run, *RUN, *extra,
                  wait=wait)


@pytest.fixture(scope="module")
def uninterrupted(demo, slurm_cluster, tmp_path_factory):
    """``sbatch --wait --nodes 2 slurm/stage2.sh ...`` on the demo, run to the end."""
    out, _ = demo
    base = tmp_path_factory.mktemp("slurm")
    run, log = base / "run", base / "job.out"
    job_id, proc = stage2_job(out, run, log, wait=True)
    text = log.read_text()
    assert proc.returncode == 0, f"{proc.stderr}\n{text[-3000:]}"
    return job_id, run, text


def test_sbatch_stage2_on_two_nodes_equals_torchrun(demo, uninterrupted, tmp_path):
    """One task on each of the 2 nodes, ranks from SLURM's variables (dist.py), rendezvous at
    the first node's name (n1 -> /etc/hosts) on a port from the job id; the metrics and the
    per-epoch log are those of ``torchrun --nproc_per_node 2`` with the same config."""
    out, _ = demo
    job_id, run, text = uninterrupted
    assert f"2 task(s) on n[1-2], master n1:{20000 + job_id % 20000}" in text
    assert "2 rank(s), ZeRO-2" in text and "ptmrec slurm: done" in text
    info = job(job_id)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 4
    reference = tmp_path / "torchrun"
    proc = ptmrec("stage2", "--config", out / "stage2" / "config.yaml", "--out", reference, *RUN,
                  ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, run)


def _first_checkpoint(run: Path, job_id: int, timeout: float = 180) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = checkpoint_states(run) if (run / "checkpoints").is_dir() else []
        if states:
            return states[0][1]["step"]
        assert job(job_id)["JobState"] in {"PENDING", "RUNNING", "CONFIGURING"}, job(job_id)
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("how", ["usr1", "requeue"])
def test_signal_checkpoints_requeues_and_resumes_exactly(demo, uninterrupted, tmp_path, how):
    """``usr1``: ``scancel --signal=USR1`` (what ``--signal=USR1@120`` sends before the time
    limit) -> the ranks agree, checkpoint, exit 3 -> the script requeues the job -> it comes
    back with --resume. ``requeue``: ``scontrol requeue`` (SLURM sends SIGTERM, as on
    preemption, and requeues it itself) -> checkpoint within KillWait, exit 3 -> resume. Either
    way the job ends COMPLETED after one restart with exactly the uninterrupted run's metrics
    and per-epoch losses."""
    out, _ = demo
    run, log = tmp_path / "run", tmp_path / "job.out"
    job_id, _ = stage2_job(out, run, log)
    first = _first_checkpoint(run, job_id)
    if how == "usr1":
        subprocess.run(["scancel", "--signal=USR1", str(job_id)], check=True)
    else:
        subprocess.run(["scontrol", "requeue", str(job_id)], check=True)
    info = wait_for(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-4000:]}"
    signal = "SIGUSR1" if how == "usr1" else "SIGTERM"
    stopped = re.search(rf"stopped by {signal} at epoch \d+, step (\d+)", text)
    assert stopped and int(stopped.group(1)) >= first, text[-4000:]
    assert "restart 1:" in text and "resumed from" in text and "ptmrec slurm: done" in text
    if how == "usr1":
        assert "requeueing job" in text
    else:
        assert "SLURM is requeueing this job already" in text
    assert_same_run(uninterrupted[1], run)


def _pipeline(*args, timeout: float = 420):
    return subprocess.run(["bash", str(SLURM / "pipeline.sh"), *map(str, args)],
                          env={**job_env(), "POLL_S": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def _ids(stdout: str) -> dict[str, int]:
    return {name: int(j) for name, j in re.findall(r"^(extract|stage1|stage2) (\d+)$", stdout,
                                                      re.M)}


def test_pipeline_runs_extract_stage1_stage2_in_order(demo, slurm_cluster, tmp_path):
    """``pipeline.sh --wait``: three jobs chained with afterok; each starts after the one before
    ended; the features equal the demo's, stage 2 learns from this pipeline's stage 1."""
    out, _ = demo
    root = tmp_path / "pipe"
    proc = _pipeline("--config", out / "stage2" / "config.yaml", "--out", root,
                     "--shards", out / "shards", "--backbone", out / "backbone", "--wait",
                     "stage1.epochs=2", "stage2.epochs=1")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    ids = _ids(proc.stdout)
    assert list(ids) == ["extract", "stage1", "stage2"], proc.stdout
    infos = {name: job(j) for name, j in ids.items()}
    assert all(i["JobState"] == "COMPLETED" for i in infos.values())
    # the later stages waited on their dependency (what --wait printed while extract ran)
    for name in ("stage1", "stage2"):
        assert f"{name} (job {ids[name]}): PENDING (Dependency)" in proc.stdout, proc.stdout
    assert infos["stage1"]["StartTime"] >= infos["extract"]["EndTime"]
    assert infos["stage2"]["StartTime"] >= infos["stage1"]["EndTime"]
    for name in ("image", "text"):
        np.testing.assert_array_equal(np.load(root / "features" / f"{name}.npy"),
                                      np.load(out / "features" / f"{name}.npy"))
    s1 = json.loads((root / "stage1" / "metrics.json").read_text())
    s2 = json.loads((root / "stage2" / "metrics.json").read_text())
    assert s1["epochs_run"] == 2 and s2["epochs_run"] == 1
    assert s2["teacher"] == str(root / "stage1")
    for name, j in ids.items():
        assert (root / "logs" / f"ptmrec-{name}-{j}.out").is_file()
    assert "pipeline.sh: done" in proc.stdout


def test_pipeline_failed_stage_cancels_the_later_ones(demo, slurm_cluster, tmp_path):
    """A stage that fails (here extract: no shards) leaves nothing pending: SLURM cancels the
    dependants (DependencyNeverSatisfied); ``--wait`` exits 1 naming the stage, its exit code,
    its log and the log's last lines."""
    out, _ = demo
    root = tmp_path / "pipe"
    proc = _pipeline("--config", out / "stage2" / "config.yaml", "--out", root,
                     "--shards", tmp_path / "no-shards", "--backbone", out / "backbone",
                     "--wait", timeout=180)
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    ids = _ids(proc.stdout)
    assert job(ids["extract"])["JobState"] == "FAILED"
    for name in ("stage1", "stage2"):
        info = job(ids[name])
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied"
        assert not list((root / "logs").glob(f"ptmrec-{name}-*"))
    assert f"failed at extract (job {ids['extract']}, FAILED, exit code 2:0" in proc.stderr
    assert "no manifest.json" in proc.stderr        # the log's last lines


def test_scripts_refuse_to_run_outside_an_allocation_and_bad_arguments(tmp_path):
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    for script in ("extract.sh", "stage1.sh", "stage2.sh"):
        proc = subprocess.run(["bash", str(SLURM / script), "--out", str(tmp_path)], env=env,
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr, proc.stderr
    proc = _pipeline("--out", tmp_path)
    assert proc.returncode == 2 and "--config is required" in proc.stderr
    proc = _pipeline("--config", tmp_path / "nope.yaml", "--out", tmp_path)
    assert proc.returncode == 2 and "nope.yaml: no such config file" in proc.stderr
    proc = _pipeline("--config", tmp_path / "nope.yaml", "--frobnicate")
    assert proc.returncode == 2 and "unknown argument '--frobnicate'" in proc.stderr


def _pid_of_rank(rank: int, marker: str, deadline: float) -> int:
    """The pid of the ``ptmrec_dist`` process of SLURM rank ``rank`` whose command line holds
    ``marker`` (the nodes of the local cluster are processes of this machine)."""
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if "ptmrec_dist" in cmd and marker in cmd and \
                    f"SLURM_PROCID={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.3)
    raise AssertionError(f"no process of rank {rank} running {marker}")


def test_a_lost_task_ends_the_job_promptly(slurm_cluster, tmp_path):
    """SIGKILL of the task of rank 1 (a lost process: out of memory, a node's OOM killer) in
    a 2-node ``slurm/stage1.sh`` job: rank 0 sees its sockets close and exits with one line,
    srun ends the step and the job fails well inside a minute (not after dist.timeout_s or
    the time limit); nothing is requeued (only exit 3 requeues)."""
    import os
    import signal

    from rec_fixtures import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n_users=400, n_items=300, per_user=20)
    run, log = tmp_path / "run", tmp_path / "job.out"
    job_id, _ = sbatch("--nodes", 2, "--ntasks-per-node", 1, "--output", log,
                       SLURM / "stage1.sh", "--model", "bpr", "--out", run, "--data", data,
                       "stage1.epochs=100000", "stage1.patience=100000", "stage1.batch_size=64")
    deadline = time.time() + 180
    while not ((run / "log.jsonl").is_file()
               and len((run / "log.jsonl").read_text().splitlines()) >= 2):
        assert time.time() < deadline and job(job_id)["JobState"] not in FINAL, \
            log.read_text()[-3000:] if log.exists() else job(job_id)
        time.sleep(0.3)
    os.kill(_pid_of_rank(1, str(run), deadline), signal.SIGKILL)
    t0 = time.time()
    info = wait_for(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{text[-3000:]}"
    assert time.time() - t0 < 60, text[-3000:]
    assert "error: rank 0 of 2: a collective failed, most likely because another rank ended" \
        in text, text[-3000:]

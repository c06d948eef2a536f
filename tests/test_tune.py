"""``ptmrec tune``: sweep files checked before Ray starts; real Ray Tune sweeps on the small demo
(local Ray on this machine's 2 CPUs): ASHA stops weak trials, every trial is a ``ptmrec stage2``
run, a failing trial is retried and recorded, a killed driver's sweep resumes without redoing
finished trials, a 2-worker trial (Ray Train, DeepSpeed in the workers) trains like torchrun, and
``slurm/tune.sh`` spreads a sweep over both nodes of the local SLURM cluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ptmrec_dist.config import load_config
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.tune import load_sweep
from run_fixtures import child_env, job, ptmrec, read_log, sbatch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("epoch", "loss", "bpr", "kt", "items", "valid")


def write_sweep(path: Path, demo_out: Path, space: dict, **sections) -> Path:
    data = {"base": str(demo_out / "stage2" / "config.yaml"), "space": space,
            "tune": {"num_cpus": 2, **sections.pop("tune", {})}, **sections}
    path.write_text(yaml.safe_dump(data))
    return path


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def ray_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines()
            if "raylet" in line or "gcs_server" in line or "ray::" in line]


def no_ray_left(timeout: float = 20.0) -> bool:
    """True once no Ray process is left (its agents take a moment to exit after shutdown)."""
    t0 = time.time()
    while ray_processes():
        if time.time() - t0 > timeout:
            print("\n".join(ray_processes()))
            return False
        time.sleep(0.25)
    return True


def tune_cli(*args, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptmrec_dist", "tune", *map(str, args)],
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def same_log(a: Path, b: Path) -> None:
    assert [{k: r.get(k) for k in KEYS} for r in read_log(a)] == \
        [{k: r.get(k) for k in KEYS} for r in read_log(b)]


# --------------------------------------------------------------------------- sweep files

def test_sweep_files_are_checked_before_ray_starts(demo, tmp_path):
    out, _ = demo

    def bad(space, match, **sections):
        path = write_sweep(tmp_path / "s.yaml", out, space, **sections)
        with pytest.raises(ConfigError, match=match):
            load_sweep(path)

    bad({"stage2.prompt_lenght": [2, 4]}, r"s\.yaml: space\.stage2\.prompt_lenght: value 2: "
        r"unknown config key 'stage2\.prompt_lenght' \(did you mean 'stage2\.prompt_len'\?\)")
    bad({"stage2.prompt_len": {"randint": [-1, 4]}}, r"space\.stage2\.prompt_len: value -1: "
        r"config key 'stage2\.prompt_len' must be >= 0")
    bad({"stage2.kt_weight": {"loguniform": [0, 10]}}, "loguniform needs low > 0")
    bad({"stage2.kt_weight": {"normal": [0, 1]}}, r"expected a list of values or one of")
    bad({"stage2.kt_weight": {"loguniform": [0.1, 10]}}, "tune.search=grid needs a list",
        tune={"search": "grid"})
    bad({"peft.method": {"grid": ["prompt", "lora"]}}, "optuna cannot take a grid",
        tune={"search": "optuna"})
    bad({"peft.method": ["prompt", "nope"]}, r"value 'nope'")
    bad({"stage2.kt_weight": [1.0]}, r"tune\.metric' must be valid/METRIC@K .*test set",
        tune={"metric": "test/recall@20"})
    bad({"stage2.kt_weight": [1.0]}, r"tune\.metric valid/recall@20 needs K=20 in eval\.ks",
        eval={"ks": [5, 10], "metric": "recall@10"})
    bad({}, "'space' must map config keys to domains")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "missing.yaml", "space": {"stage2.lr": [0.1]}}))
    with pytest.raises(ConfigError, match=r"base config not found: .*missing\.yaml"):
        load_sweep(path)
    ok = load_sweep(write_sweep(tmp_path / "ok.yaml", out, {"stage2.prompt_len": {
        "randint": [2, 16]}}, stage2={"epochs": 3}), ["tune.num_samples=5"])
    assert ok.cfg.stage2.epochs == 3 and ok.cfg.tune.num_samples == 5
    assert Path(ok.cfg.stage2.teacher).is_absolute()


# --------------------------------------------------------------------------- local sweeps

@pytest.fixture(scope="module")
def asha_sweep(demo, tmp_path_factory):
    """4 grid trials over the KT weight, ASHA (grace 1 epoch, halving) over 4 epochs."""
    out, _ = demo
    base = tmp_path_factory.mktemp("tune")
    sweep = write_sweep(base / "kt.yaml", out, {"stage2.kt_weight": [10.0, 0.0, 1.0, 100.0]},
                        tune={"search": "grid", "num_samples": 1, "scheduler": "asha",
                              "grace_period": 1, "reduction_factor": 2},
                        stage2={"epochs": 4})
    t0 = time.time()
    proc = tune_cli(sweep, "--out", base / "out")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return base / "out", proc, time.time() - t0


def test_asha_sweep_writes_results_best_config_and_plot(asha_sweep):
    out, proc, _ = asha_sweep
    table = rows(out)
    assert [r["stage2.kt_weight"] for r in table] == ["10.0", "0.0", "1.0", "100.0"]
    stopped = [r for r in table if r["status"] == "stopped"]
    assert stopped and all(r["stopped_by"] == "asha" and int(r["epochs_run"]) < 4
                           for r in stopped)
    assert all(r["status"] in ("completed", "stopped") and r["error"] == "" for r in table)
    for r in table:           # the best-valid epoch's valid and test metrics, per trial
        assert 0 <= float(r["valid/recall@20"]) <= 1 and 0 <= float(r["test/recall@20"]) <= 1
        assert float(r["wall_s"]) > 0 and r["retries"] == "0"
    best = max(table, key=lambda r: float(r["valid/recall@20"]))
    cfg = load_config(out / "best.yaml")
    assert cfg.stage2.kt_weight == float(best["stage2.kt_weight"])
    assert "# best trial of" in (out / "best.yaml").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # experiment tracking: Ray Tune's own TensorBoard event files, one per trial
    assert len({p.parent for p in (out / "ray").rglob("events.out.tfevents.*")}) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["stopped_early"] == len(stopped)
    assert summary["best"]["params"] == {"stage2.kt_weight": float(best["stage2.kt_weight"])}
    assert "4 trials (" in proc.stdout and "Ray start-up" in proc.stdout
    # tune.max_concurrent_trials=1: each trial starts after the one before wrote its last epoch
    runs = sorted((json.loads((out / "trials" / r["trial"] / "attempts.jsonl").read_text()
                              .splitlines()[0])["start"], out / "trials" / r["trial"])
                  for r in table)
    for (_, before), (start, _) in zip(runs, runs[1:]):
        assert start >= (before / "log.jsonl").stat().st_mtime - 0.5
    assert no_ray_left()                               # Ray shut down, nothing left


def test_a_trial_is_the_same_run_as_ptmrec_stage2(asha_sweep, tmp_path):
    out, _, _ = asha_sweep
    done = next(r for r in rows(out) if r["status"] == "completed")
    trial = out / "trials" / done["trial"]
    proc = ptmrec("stage2", "--config", trial / "config.yaml", "--out", tmp_path / "direct")
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_log(trial, tmp_path / "direct")
    assert json.loads((trial / "metrics.json").read_text())["test"] == \
        json.loads((tmp_path / "direct" / "metrics.json").read_text())["test"]


def test_optuna_search_proposes_within_the_space(demo, tmp_path):
    out, _ = demo
    sweep = write_sweep(tmp_path / "opt.yaml", out,
                        {"stage2.kt_weight": {"loguniform": [0.5, 50.0]},
                         "peft.method": ["prompt", "ia3"]},
                        tune={"search": "optuna", "num_samples": 2, "scheduler": "fifo"},
                        stage2={"epochs": 1})
    proc = tune_cli(sweep, "--out", tmp_path / "out")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    table = rows(tmp_path / "out")
    assert len(table) == 2 and all(r["status"] == "completed" for r in table)
    for r in table:
        assert 0.5 <= float(r["stage2.kt_weight"]) <= 50.0 and r["peft.method"] in ("prompt", "ia3")
        cfg = load_config(tmp_path / "out" / "trials" / r["trial"] / "config.yaml")
        assert cfg.peft.method == r["peft.method"]


def test_failing_trial_is_retried_recorded_and_the_sweep_finishes(demo, tmp_path):
    out, _ = demo
    good = load_config(out / "stage2" / "config.yaml").backbone.name_or_path
    sweep = write_sweep(tmp_path / "bb.yaml", out,
                        {"backbone.name_or_path": [good, str(tmp_path / "no-backbone")]},
                        tune={"search": "grid", "num_samples": 1, "max_failures": 1,
                              "scheduler": "fifo"}, stage2={"epochs": 1})
    proc = tune_cli(sweep, "--out", tmp_path / "out")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ok, failed = rows(tmp_path / "out")
    assert ok["status"] == "completed" and ok["retries"] == "0"
    assert failed["status"] == "error" and failed["retries"] == "1"    # max_failures=1
    assert "no-backbone" in failed["error"]
    assert "1 failed" in proc.stdout
    assert load_config(tmp_path / "out" / "best.yaml").backbone.name_or_path == good


def test_killed_driver_resumes_without_redoing_finished_trials(demo, tmp_path):
    out, _ = demo
    sweep = write_sweep(tmp_path / "kt.yaml", out, {"stage2.kt_weight": [1.0, 10.0, 100.0]},
                        tune={"search": "grid", "num_samples": 1, "scheduler": "fifo"},
                        stage2={"epochs": 2})
    dest = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ptmrec_dist", "tune", str(sweep), "--out",
                             str(dest)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while not list(dest.glob("trials/*/metrics.json")):       # the first trial finished
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "no trial finished"
        time.sleep(0.2)
    time.sleep(1.5)                       # the experiment state is saved every second
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and everything it started, at once
    proc.wait()
    first = next(dest.glob("trials/*/metrics.json")).parent
    no_ray_left()
    again = tune_cli(sweep, "--out", dest)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    again = tune_cli(sweep, "--out", dest, "--resume")
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-3000:]}"
    assert "resuming the sweep" in again.stderr
    table = rows(dest)
    assert [r["status"] for r in table] == ["completed"] * 3
    assert (first / "attempts.jsonl").read_text().count("\n") == 1   # not run again
    assert no_ray_left()


def test_two_worker_trial_trains_like_torchrun(demo, tmp_path):
    """``tune.workers_per_trial=2``: the trial is a Ray Train TorchTrainer with 2 gloo workers,
    each one DeepSpeed rank of the same stage-2 run; its per-epoch losses and metrics equal a
    2-process torchrun run of the trial's config."""
    out, _ = demo
    too_big = write_sweep(tmp_path / "big.yaml", out, {"stage2.kt_weight": [10.0]},
                          tune={"search": "grid", "workers_per_trial": 2, "cpus_per_worker": 1})
    proc = tune_cli(too_big, "--out", tmp_path / "big")      # 2 x 1 CPU + its driver > 2 CPUs
    assert proc.returncode == 2 and "a trial needs 2.01 CPU(s)" in proc.stderr, proc.stderr
    assert no_ray_left()
    sweep = write_sweep(tmp_path / "w2.yaml", out, {"stage2.kt_weight": [10.0]},
                        tune={"search": "grid", "num_samples": 1, "scheduler": "fifo",
                              "workers_per_trial": 2, "cpus_per_worker": 0.99},
                        stage2={"epochs": 2})
    proc = tune_cli(sweep, "--out", tmp_path / "out")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (row,) = rows(tmp_path / "out")
    assert row["status"] == "completed"
    trial = tmp_path / "out" / "trials" / row["trial"]
    assert "2 rank(s)" in (trial / "stdout.log").read_text()
    assert json.loads((trial / "metrics.json").read_text())["world_size"] == 2
    ref = ptmrec("stage2", "--config", trial / "config.yaml", "--out", tmp_path / "torchrun",
                 ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    same_log(trial, tmp_path / "torchrun")


# --------------------------------------------------------------------------- on SLURM

def test_tune_sh_spreads_a_sweep_over_two_slurm_nodes(demo, slurm_cluster, tmp_path):
    """``sbatch --nodes 2 slurm/tune.sh``: a Ray head on n1 and a Ray node on n2 (per-job ports
    and temp dirs), 2 concurrent 1-CPU trials -> one on each node; afterwards no Ray process
    and no temp dir of the job is left."""
    out, _ = demo
    sweep = write_sweep(tmp_path / "kt.yaml", out, {"stage2.kt_weight": [1.0, 10.0]},
                        tune={"search": "grid", "num_samples": 1, "scheduler": "fifo",
                              "max_concurrent_trials": 2}, stage2={"epochs": 2})
    log = tmp_path / "job.out"
    job_id, proc = sbatch("--nodes", 2, "--output", log, ROOT / "slurm" / "tune.sh", sweep,
                          "--out", tmp_path / "out", wait=True)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "Ray cluster of 2 node(s) up" in text and "ptmrec slurm: done" in text
    assert job(job_id)["JobState"] == "COMPLETED"
    table = rows(tmp_path / "out")
    assert [r["status"] for r in table] == ["completed", "completed"]
    nodes = {json.loads((tmp_path / "out" / "trials" / r["trial"] / "attempts.jsonl")
                        .read_text().splitlines()[0])["node"] for r in table}
    assert len(nodes) == 2, nodes
    assert no_ray_left() and not list(Path("/tmp").glob(f"ray-{job_id}-*"))

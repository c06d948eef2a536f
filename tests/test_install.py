"""Installs that work outside this repository (issue 19, part 4): a non-editable ``pip install .``
carries everything the commands read at run time (the DeepSpeed configs of ``ds_configs/`` as
``ptmrec_dist/ds_configs/``), and pyproject.toml names every package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from rec_fixtures import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_names_every_package():
    """The package list is written out (for the ds_configs mapping): a new subpackage must be
    added there, or a wheel would ship without it."""
    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    assert set(find_packages(str(ROOT), include=["ptmrec_dist*"])) <= listed
    assert "ptmrec_dist.ds_configs" in listed


def test_a_non_editable_install_runs_stage1_outside_the_checkout(tmp_path):
    """A wheel built from the sources, installed into a folder of its own (no checkout beside
    it): ``ptmrec stage1`` runs from another directory and reads the shipped DeepSpeed config."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("ptmrec_dist", "ds_configs"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel")], check=True, capture_output=True, cwd=src)
    wheel = next((tmp_path / "wheel").glob("ptmrec_dist-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert sorted(p.name for p in (site / "ptmrec_dist" / "ds_configs").glob("*.json")) == \
        sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))

    data = make_tiny_dataset(tmp_path / "data")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    where = subprocess.run([sys.executable, "-c", "import ptmrec_dist.train.engine as e; "
                            "print(e.ds_config_path('zero0'))"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    run = subprocess.run([sys.executable, "-m", "ptmrec_dist", "stage1", "--model", "bpr",
                          "--out", str(tmp_path / "run"), f"data.path={data}",
                          "stage1.epochs=2", "stage1.batch_size=64"],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_clone_without_shared_data_skips_those_tests_and_ci_requires_them(tmp_path):
    """A user's clone has no ``../shared/``: the real-data tests are skipped with one line
    naming the folder (pytest exits 0); with ``PTMREC_REQUIRE_SHARED_DATA=1`` (``.ci/run``) the
    same absence fails."""
    clone = tmp_path / "work" / "clone"           # no work/shared beside it
    for name in ("tests", "ptmrec_dist", "ds_configs", "configs"):
        shutil.copytree(ROOT / name, clone / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k != "PTMREC_REQUIRE_SHARED_DATA"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "tests/test_ml100k_e2e.py"]
    skipped = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    missing = str(clone.parent / "shared" / "data" / "ml100k-posters")
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    assert "skipped" in skipped.stdout and f"real data set not found: {missing}" in \
        skipped.stdout, skipped.stdout[-3000:]
    required = subprocess.run(cmd, cwd=clone, env={**env, "PTMREC_REQUIRE_SHARED_DATA": "1"},
                              capture_output=True, text=True)
    assert required.returncode == 1 and f"real data set not found: {missing}" in \
        required.stdout, required.stdout[-3000:]

"""The command line end to end: `python -m ptmrec_dist`, the console script, the demo contract."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptmrec_dist.cli import main
from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.data.shards import load_manifest, verify_shards

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ptmrec_dist", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def check_demo(out: Path, size: str, n_items: int, n_users: int):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size"] == size
    assert summary["not_yet_available"] == []
    for sub in ("data", "shards", "backbone", "features", "stage1", "stage1-pop", "stage2"):
        assert (out / sub / "config.yaml").is_file()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == ["data", "shards", "backbone", "features", "stage1-pop",
                                        "stage1", "stage2"]
    # stage 2 (PTMRec) next to stage 1, with its parameter counts and its own outputs
    s2 = json.loads((out / "stage2" / "metrics.json").read_text())
    assert summary["stages"]["stage2"]["test"]["recall@20"] == round(s2["test"]["recall@20"], 4)
    bb = summary["stages"]["stage2"]["backbone_params"]
    assert 0 < bb["trainable"] < 0.05 * bb["total"] and s2["teacher"] == str(out / "stage1")
    for f in ("adapter.safetensors", "features/image.npy", "user_repr.npy"):
        assert (out / "stage2" / f).is_file()
    # stage 1 (vbpr on the extracted features) next to the popularity baseline
    for folder, model in (("stage1", "vbpr"), ("stage1-pop", "pop")):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["model"] == model
        assert summary["stages"][folder]["test"]["recall@20"] == \
            round(metrics["test"]["recall@20"], 4)
        assert (out / folder / "user_repr.npy").is_file()
    s1 = load_config(out / "stage1" / "config.yaml")
    assert s1.data.features == str(out / "features") and s1.data.path == str(out / "data")
    features = json.loads((out / "features" / "meta.json").read_text())
    assert features["n_present"] == n_items and features["backbone"] == str(out / "backbone")
    assert summary["steps"]["backbone"]["heldout"]
    cfg = load_config(out / "config.yaml")
    assert (cfg.synthetic.n_items, cfg.synthetic.n_users) == (n_items, n_users)
    stats = load_interactions(out / "data").stats()
    assert summary["data"] == stats
    assert (stats["users"], stats["items"]) == (n_users, n_items)
    manifest = load_manifest(out / "shards")
    good, bad = verify_shards(out / "shards", manifest)
    assert bad.total == 0 and len(good) == summary["steps"]["shards"]["n_shards"]
    assert manifest["n_written"] == n_items
    return summary


def test_demo_tiny_through_python_m(tmp_path):
    out = tmp_path / "demo"
    res = run_module("demo", "--out", str(out), "--size", "tiny", timeout=900)
    assert res.returncode == 0, res.stderr
    assert "users:         200" in res.stdout
    check_demo(out, "tiny", 300, 200)


def test_demo_overrides_and_bad_key(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "tiny", "synthetic.n_items=120",
                 "synthetic.n_users=50", "data.shard_size=40", "demo_backbone.width=32",
                 "demo_backbone.heads=2", "demo_backbone.layers=1", "demo_backbone.epochs=1",
                 "extract.num_workers=0"]) == 0
    summary = check_demo(out, "tiny", 120, 50)
    assert summary["steps"]["shards"]["n_shards"] == 3
    res = run_module("demo", "--out", str(tmp_path / "x"), "--size", "tiny", "synthetic.n_itemz=5")
    assert res.returncode == 2
    assert "unknown config key 'synthetic.n_itemz' (did you mean 'synthetic.n_items'?)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_make_data_flags_are_config_overrides(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["make-data", "synthetic", "--out", str(out), "--items", "40", "--users", "30",
                 "--seed", "5", "--image-size", "24", "synthetic.min_interactions=4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_items"], summary["n_users"]) == (40, 30)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["synthetic"]["n_items"] == 40 and cfg["synthetic"]["seed"] == 5
    assert cfg["synthetic"]["min_interactions"] == 4
    counts = load_interactions(out).stats()["interactions_per_user"]
    assert counts["min"] >= 4


def test_overrides_may_follow_options_and_unknown_flags_fail(tmp_path, capsys):
    data = tmp_path / "syn"
    assert main(["make-data", "synthetic", "--out", str(data), "--items", "30", "--users", "10",
                 "--image-size", "20"]) == 0
    assert main(["shard", str(data), "--out", str(tmp_path / "sh"), "data.shard_size=7"]) == 0
    assert len(load_manifest(tmp_path / "sh")["shards"]) == 5
    with pytest.raises(SystemExit) as exc:
        main(["shard", str(data), "--out", str(tmp_path / "sh"), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_stats_uses_data_path_from_config(tmp_path, capsys):
    data = tmp_path / "syn"
    assert main(["make-data", "synthetic", "--out", str(data), "--items", "30", "--users", "10",
                 "--image-size", "20"]) == 0
    capsys.readouterr()
    assert main(["stats", f"data.path={data}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == 10
    assert main(["stats"]) == 2
    assert "pass PATH or set data.path" in capsys.readouterr().err


def test_version_and_console_script():
    res = run_module("--version")
    assert res.returncode == 0 and res.stdout.startswith("ptmrec_dist ")
    # `make` installs the package (editable); its console script must be there
    assert importlib.metadata.distribution("ptmrec_dist").version
    script = Path(sys.executable).parent / "ptmrec"
    assert script.is_file(), "console script `ptmrec` missing from the venv"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for command in ("make-data", "make-backbone", "stats", "shard", "extract", "stage1",
                    "evaluate", "verify", "demo", "config"):
        assert command in res.stdout


@pytest.mark.heavy
def test_demo_default_size(tmp_path):
    out = tmp_path / "demo"
    res = run_module("demo", "--out", str(out), "--size", "default", timeout=900)
    assert res.returncode == 0, res.stderr
    check_demo(out, "default", 3000, 3000)


def test_verify_names_bad_shards(tmp_path, capsys):
    data, shards = tmp_path / "syn", tmp_path / "sh"
    assert main(["make-data", "synthetic", "--out", str(data), "--items", "30", "--users", "10",
                 "--image-size", "20"]) == 0
    assert main(["shard", str(data), "--out", str(shards), "--shard-size", "10"]) == 0
    capsys.readouterr()
    assert main(["verify", str(shards)]) == 0
    assert "ok: 3 shards, 30 items" in capsys.readouterr().out
    tar = shards / "items-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF
    tar.write_bytes(bytes(raw))
    (shards / "items-000002.tar").unlink()
    assert main(["verify", str(shards)]) == 2
    err = capsys.readouterr().err
    assert "1 corrupt shard(s): items-000001.tar" in err
    assert "1 missing shard(s): items-000002.tar" in err
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_run_dir_contract(tmp_path):
    from ptmrec_dist.run import RunDir
    cfg = load_config(None, ["stage2.kt_weight=0.5"])
    run = RunDir(tmp_path / "r", cfg).start()
    run.log(epoch=0, loss=1.5)
    run.log(epoch=1, loss=1.25)
    run.write_metrics({"valid": {"recall@20": 0.1}, "test": {"recall@20": 0.09}})
    lines = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and all("elapsed_s" in x for x in lines)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["valid"]["recall@20"] == 0.1
    assert load_config(tmp_path / "r" / "config.yaml").stage2.kt_weight == 0.5
    quiet = RunDir(tmp_path / "q", cfg, is_main=False).start()   # non-main ranks write nothing
    quiet.log(epoch=0)
    quiet.write_metrics({})
    assert not (tmp_path / "q").exists()

"""Helpers shared by the benchmarks (not a benchmark: run_all.py skips files starting with _)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` size (``VmRSS``, ``VmHWM``, ...) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    return status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, *args, **kw):
    """``(fn(*args, **kw), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process (its own peak RSS) and return the JSON
    object it prints last; also echoed."""
    res = subprocess.run([sys.executable, script, "--child", *args], capture_output=True,
                         text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def write_result(out_dir: str | Path, name: str, result: dict) -> Path:
    """``OUT/<name>.json`` (indented, written atomically), the file `make bench` collects, with
    a ``_provenance`` block (date, command line, commit, cores, torch threads, versions) that
    ``bench/_readme.py`` puts beside every figure."""
    import datetime

    from ptmrec_dist.io import atomic_write_json
    from ptmrec_dist.run import machine_provenance

    path = Path(out_dir) / f"{name}.json"
    prov = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]], **machine_provenance()}
    atomic_write_json(path, {**result, "_provenance": prov})
    return path


def quiet(*_) -> None:
    """A ``log=`` for runs whose own progress lines would drown the bench's."""


def ablation_kind(name: str) -> str:
    """``stage1`` (the file sets no stage-2 or peft key), ``one-stage`` (``stage2.teacher: ""``)
    or ``two-stage``, for a ``configs/ablations/<name>.yaml``."""
    data = yaml.safe_load((ABLATIONS / f"{name}.yaml").read_text()) or {}
    if "stage2" not in data and "peft" not in data:
        return "stage1"
    return "one-stage" if (data.get("stage2") or {}).get("teacher", None) == "" else "two-stage"


def resumable(out: Path, label: str, run: Callable[[], dict]) -> dict:
    """One run of a bench that resumes run by run: ``OUT/bench.json`` when an earlier invocation
    finished it; otherwise print ``-- LABEL``, call ``run()`` (the run's metrics and whatever the
    bench adds), add ``wall_s`` and write ``bench.json`` last, so that a run cut short is redone."""
    from ptmrec_dist.io import atomic_write_json

    done = Path(out) / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    print(f"-- {label}", flush=True)
    t0 = time.perf_counter()
    m = dict(run())
    m["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(done, m)
    return m


def t_interval(diffs: list[float]) -> dict:
    """Mean of paired differences with its 95 % t interval (n - 1 degrees of freedom);
    ``lo``/``hi`` None for one difference."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": len(d)}
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


# headroom arms of the synthetic benchmark: stage 1 on features that encode exactly some of the
# true item attributes (truth.json), instead of the backbone's
HEADROOM = {  # arm: (which attributes, row scale)
    "oracle": ("visible", "frozen"),            # every attribute the modality shows
    "oracle-unit": ("visible", "unit"),         # the same codes, rows of norm 1
    "caption-visible": ("caption", "frozen"),   # only those the pretraining captions also name
}
RULES, SCALES = ("visible", "caption"), ("frozen", "unit")


def attribute_features(data_dir: Path, frozen: Path, out: Path, rule: str,
                       scale: str = "frozen") -> Path:
    """Item features of the synthetic set at ``DATA_DIR`` that encode exactly some of its true
    attributes: per modality of the FROZEN features folder, the one-hot codes of the attributes
    truth.json says the modality shows (RULE ``visible``), or of those among them that the
    backbone's pretraining captions name (``caption``), concatenated; rows scaled to the frozen
    features' mean row norm (SCALE ``frozen``: only the content differs) or to norm 1
    (``unit``; the base models are sensitive to the scale). Rows in the catalog's item order;
    ``meta.json`` (the attributes per modality) is written last, and a complete folder is
    reused."""
    import numpy as np

    from ptmrec_dist.clip.demo_eval import read_truth
    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.io import atomic_write_json
    from ptmrec_dist.rec.features import NAMES

    if rule not in RULES or scale not in SCALES:
        raise ValueError(f"rule {rule!r} / scale {scale!r}: expected a rule of {RULES} and a "
                         f"scale of {SCALES}")
    out = Path(out)
    if (out / "meta.json").is_file():
        return out
    inter = load_interactions(data_dir, warn=lambda _m: None)
    ids = [str(i) for i in (inter.item_ids if inter.item_ids is not None
                            else range(inter.n_items))]
    truth_path = Path(data_dir) / "truth.json"
    truth = read_truth(Path(data_dir), ids)
    if truth is None:
        raise FileNotFoundError(f"{truth_path}: headroom features need the synthetic set's truth")
    raw = json.loads(truth_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    meta = {"rule": rule, "scale": scale, "attributes": {}, "source": str(truth_path)}
    for modality, (name, _) in NAMES.items():
        if not (Path(frozen) / name).is_file():
            continue
        attrs = [a for a in raw["attributes"] if modality in raw["visibility"][a]
                 and (rule == "visible" or a in raw["caption_attributes"])]
        if not attrs:
            raise ValueError(f"no attribute of {truth_path} is {rule} in the {modality} modality")
        codes = np.concatenate([np.eye(len(truth["vocab"][a]), dtype=np.float32)[truth["attrs"][a]]
                                for a in attrs], axis=1)
        norm = 1.0
        if scale == "frozen":
            ref = np.load(Path(frozen) / name, mmap_mode="r")
            norm = float(np.linalg.norm(np.asarray(ref, dtype=np.float32), axis=1).mean())
        np.save(out / name, codes * (norm / np.sqrt(len(attrs))))
        meta["attributes"][modality] = attrs
    atomic_write_json(out / "meta.json", meta)
    return out

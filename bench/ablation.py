"""The PTMRec ablation on the synthetic benchmark with the demo backbone: every config in
``configs/ablations/`` for each base model and seed, and a table of test Recall@10/20,
NDCG@10/20, trainable share of the backbone and wall time (mean +- std over seeds).

    .venv/bin/python bench/ablation.py [--items 800 --users 800] [--seeds 0 1 2]
        [--models vbpr freedom] [--ablations frozen joint-full ...] [--work DIR] [k=v ...]
    .venv/bin/python bench/ablation.py --models vbpr --ablations ptmrec-random-init
        # the initialisation alone; the table then holds it next to the earlier runs

* Inputs (data, shards, demo backbone, frozen features) are built once under ``WORK/inputs``
  with the demo's own steps (``ptmrec_dist.demo.prepare_inputs``).
* ``frozen`` is a stage-1 run (``configs/ablations/frozen.yaml``); it is also the teacher of the
  two-stage ablations of the same model and seed. Files with ``stage2.teacher: ""`` are
  one-stage runs; the others get ``stage2.teacher`` set to that frozen run.
* The seed (``seed``) changes every model initialisation and sampling, not the data.
* A finished run (its ``bench.json``: metrics, wall time, probes) is reused, so an interrupted
  bench resumes.

Model selection is on valid only (early stopping inside each run); the table reports test.
It also reports whether the features learnt what the frozen backbone misses: the 5-fold accuracy
of a ridge probe predicting each item's ``pattern`` from its image features and ``material`` from
its text features (the synthetic generator's ground truth, ``truth.json``; chance 1/6), for the
frozen features and each stage-2 run's (best-epoch) features.
Writes ``OUT/ablation.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _util import ABLATIONS, ablation_kind as kind, quiet, resumable, write_result  # noqa: E402,E501

ORDER = ["frozen", "joint-full", "joint-prompt", "ptmrec-no-kt", "ptmrec", "ptmrec-random-init"]
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def prepare(work: Path, items: int, users: int, overrides: list[str]):
    from ptmrec_dist.config import load_config, save_config
    from ptmrec_dist.demo import demo_config, prepare_inputs
    from ptmrec_dist.run import RunDir

    cfg = load_config(None, [f"synthetic.n_items={items}", f"synthetic.n_users={users}",
                             *overrides], base=demo_config("default"))
    inputs = work / "inputs"
    done = inputs / "prepared.yaml"
    if done.is_file():
        return load_config(done)
    prepare_inputs(cfg, inputs, RunDir(inputs, cfg).start(), log=print)
    cfg.data.path = str(inputs / "data")
    cfg.data.features = str(inputs / "features")
    save_config(cfg, inputs)
    (inputs / "config.yaml").rename(done)
    return cfg


def run_one(base, model: str, seed: int, name: str, work: Path) -> dict:
    from ptmrec_dist.config import load_config
    from ptmrec_dist.train.stage1 import run_stage1
    from ptmrec_dist.train.stage2 import run_stage2

    out = work / model / f"seed{seed}" / name

    def run() -> dict:
        cfg = copy.deepcopy(base)
        cfg.seed = seed
        cfg.recommender.name = model
        extra = []
        if kind(name) == "two-stage":
            extra.append(f"stage2.teacher={work / model / f'seed{seed}' / 'frozen'}")
        cfg = load_config(ABLATIONS / f"{name}.yaml", extra, base=cfg)
        m = (run_stage1 if kind(name) == "stage1" else run_stage2)(cfg, out, log=quiet)
        features = Path(cfg.data.features) if kind(name) == "stage1" else out / "features"
        truth = json.loads((Path(cfg.data.path) / "truth.json").read_text())
        return dict(m, probe=probes(features, truth))   # the run's metrics + ours
    return resumable(out, f"{model} seed {seed} {name}", run)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                   ridge: float = 1.0) -> float:
    """k-fold accuracy of a one-vs-rest ridge classifier on standardised features."""
    x = features.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = np.random.default_rng(0).permutation(len(labels))
    hits = 0
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        y = np.eye(labels.max() + 1)[labels[train]]
        w = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ y)
        hits += int(((x[test] @ w).argmax(1) == labels[test]).sum())
    return hits / len(labels)


def probes(features_dir: Path, truth: dict) -> dict:
    attrs = truth["item_attributes"]
    image = np.load(features_dir / "image.npy")
    text = np.load(features_dir / "text.npy")
    return {"pattern_from_image": round(probe_accuracy(image, np.array(attrs["pattern"])), 4),
            "material_from_text": round(probe_accuracy(text, np.array(attrs["material"])), 4)}


def summarise(runs: dict) -> dict:
    table = {}
    for (model, name), ms in runs.items():
        row = {k: [m["test"][k] for m in ms] for k in METRICS}
        bb = [m.get("params", {}).get("backbone", {}) for m in ms]
        table[f"{model}/{name}"] = {
            **{k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
               for k, v in row.items()},
            "trainable_backbone_pct": bb[0].get("trainable_pct", 0.0) if bb[0] else 0.0,
            "wall_s": float(np.mean([m["wall_s"] for m in ms])),
            **{f"probe_{k}": float(np.mean([m["probe"][k] for m in ms]))
               for k in ("pattern_from_image", "material_from_text")},
            "best_epochs": [m["best_epoch"] for m in ms], "n_seeds": len(ms)}
    for (model, name) in runs:
        frozen = table.get(f"{model}/frozen")
        if frozen:
            row = table[f"{model}/{name}"]
            for k in ("recall@10", "recall@20"):
                row[f"{k}_vs_frozen_pct"] = round(100 * (row[k]["mean"] / frozen[k]["mean"] - 1), 2)
    return table


def markdown(table: dict) -> str:
    lines = ["| model / ablation | R@10 | R@20 | N@10 | N@20 | R@10 vs frozen | backbone trained | "
             "time | probe pattern (image) / material (text) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in table.items():
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS]
        lines.append(f"| {key} | " + " | ".join(cells)
                     + f" | {r.get('recall@10_vs_frozen_pct', 0):+.1f} % | "
                       f"{r['trainable_backbone_pct']} % | {r['wall_s']:.0f} s | "
                       f"{r['probe_pattern_from_image']:.3f} / {r['probe_material_from_text']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=str(ROOT / "out" / "ablation"))
    ap.add_argument("--items", type=int, default=800)
    ap.add_argument("--users", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["vbpr", "freedom"])
    ap.add_argument("--ablations", nargs="+", default=ORDER[:-1],
                    help=f"configs/ablations/ names (also: {ORDER[-1]})")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    work = Path(args.work)
    base = prepare(work, args.items, args.users, args.overrides)
    t0 = time.perf_counter()
    for model in args.models:
        for seed in args.seeds:
            for name in ["frozen"] + [a for a in args.ablations if a != "frozen"]:
                run_one(base, model, seed, name, work)
    # the table covers every finished run of WORK for these seeds (earlier invocations too)
    runs: dict = {}
    for model in sorted({p.parents[2].name for p in work.glob("*/seed*/*/bench.json")},
                        key=lambda m: (m not in args.models, m)):
        for name in ORDER:
            ms = [json.loads((work / model / f"seed{seed}" / name / "bench.json").read_text())
                  for seed in args.seeds
                  if (work / model / f"seed{seed}" / name / "bench.json").is_file()]
            if ms:
                runs[(model, name)] = ms
    table = summarise(runs)
    result = {"items": args.items, "users": args.users, "seeds": args.seeds,
              "overrides": args.overrides, "table": table, "markdown": markdown(table),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, "ablation", result)
    print(result["markdown"])
    from ptmrec_dist import dist
    dist.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Catalog scale: time and peak memory of each step of the pipeline at growing catalog sizes
(users scaled alike: one user per ten items, as 1M items x 100k users), the fitted growth
exponent of each step's time against the item count, and a log-log plot.

    .venv/bin/python bench/scaling.py [--sizes 10000,100000] [--work out/scaling]

Steps, each in a fresh process (its own peak RSS), each size's outputs feeding the next step:

* ``make-data``: ``make-data synthetic`` (64 px images, item files, interactions);
* ``shard``: ``ptmrec shard`` of that catalog (1,000 items per shard);
* ``extract``: ``ptmrec extract`` with a demo-shaped CLIP (random weights: the speed is the
  shape's) over the shards; stage 2's per-epoch feature-bank refresh runs this same
  ``extract_all`` over the same shards, so its growth is this step's;
* ``knn-graph``: FREEDOM's item-item kNN graph (``rec.graph.knn_graph``, chunked, k 10) on the
  extracted image features;
* ``stage1-epoch``: one vbpr epoch (``ptmrec stage1``, the extracted features; the time of the
  epoch as the run records it, not the process);
* ``evaluate-per-user``: that run's valid evaluation time divided by its evaluated users (full
  ranking: every user scores every item, so this grows with the catalog; the evaluation's
  memory stays bounded by ``eval.memory_mb``).

The exponent is the least-squares slope of log(seconds) on log(items) (two sizes: the slope
between them). Goal (issue 21): at most 1.1 for shard, extract, the stage-1 epoch and evaluation
per user. ``make-data`` samples each user's interactions from a utility over **every** item
(users x items work: quadratic when users grow with items) and the exact kNN graph compares
every pair of items (quadratic, chunked to bound memory): both are reported as measured. Sizes
below ~10k items carry fixed costs (process start-up, first-call overheads) that flatten the
slope. Resumable: a size and step whose result exists in ``WORK/<items>/<step>.json`` is not
rerun. Writes OUT/scaling.json and OUT/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import peak_rss_mb, run_child, write_result  # noqa: E402

STEPS = ("make-data", "shard", "extract", "knn-graph", "stage1-epoch", "evaluate-per-user")
LINEAR_GOAL = ("shard", "extract", "stage1-epoch", "evaluate-per-user")
USERS_PER_ITEM = 0.1


def _users(items: int) -> int:
    return max(50, int(items * USERS_PER_ITEM))


def child(step: str, items: int, work: Path) -> dict:
    """Run one step for one size; returns {"seconds", "peak_rss_mb", ...}."""
    import numpy as np
    import torch

    from ptmrec_dist.config import Config, DemoBackboneConfig, SyntheticConfig
    from ptmrec_dist.dist import DistEnv

    data, shards, feats = work / "data", work / "shards", work / "features"
    extra: dict = {}
    if step == "make-data":
        from ptmrec_dist.data.synthetic import generate
        t0 = time.perf_counter()
        generate(SyntheticConfig(n_items=items, n_users=_users(items), seed=0,
                                 image_size=DemoBackboneConfig().image_size), data)
        seconds = time.perf_counter() - t0
    elif step == "shard":
        from ptmrec_dist.data.shards import write_shards
        t0 = time.perf_counter()
        write_shards(data, shards, shard_size=1000, log=lambda m: None)
        seconds = time.perf_counter() - t0
    elif step == "extract":
        from transformers import CLIPModel

        from extract import save_model
        from ptmrec_dist.clip.demo_backbone import clip_config as demo_clip_config
        from ptmrec_dist.clip.extract import run_extract
        from ptmrec_dist.clip.tokenizer import build_tokenizer

        dcfg = DemoBackboneConfig()
        texts = [json.loads(x)["text"] for x in
                 (data / "items.jsonl").read_text().splitlines()[:2000]]
        tok = build_tokenizer(texts, max_len=dcfg.max_text_len)
        torch.manual_seed(0)
        model_dir = save_model(CLIPModel(demo_clip_config(dcfg, tok)).eval(), tok,
                               dcfg.image_size, work / "backbone")
        cfg = Config()
        cfg.backbone.name_or_path = str(model_dir)
        t0 = time.perf_counter()
        meta = run_extract(cfg, shards, feats, DistEnv(), log=lambda m: None)
        seconds = time.perf_counter() - t0
        extra["items_per_s"] = round(items / seconds, 1)
        extra["rank0_items_per_s"] = meta["rank0_items_per_s"]
    elif step == "knn-graph":
        from ptmrec_dist.rec.graph import knn_graph
        f = torch.from_numpy(np.load(feats / "image.npy").astype(np.float32))
        t0 = time.perf_counter()
        knn_graph(f, k=10)
        seconds = time.perf_counter() - t0
    elif step in ("stage1-epoch", "evaluate-per-user"):
        m = work / "stage1" / "metrics.json"
        if not m.is_file():
            from stage1 import stage1
            stage1(work / "stage1", str(data), "vbpr", str(feats), "stage1.epochs=1",
                   "stage1.patience=1000", "stage1.batch_size=2048")
        metrics = json.loads(m.read_text())
        if step == "stage1-epoch":
            seconds = metrics["epoch_s_mean"]
        else:
            n_eval = _valid_users(data)
            seconds = metrics["eval_s_mean"] / n_eval
            extra.update(eval_s=metrics["eval_s_mean"], evaluated_users=n_eval)
        extra["run_peak_rss_mb"] = metrics.get("peak_rss_mb")
    else:
        raise ValueError(step)
    return {"step": step, "items": items, "users": _users(items), "seconds": round(seconds, 6),
            "peak_rss_mb": round(peak_rss_mb()), **extra}


def _valid_users(data: Path) -> int:
    """Users with a valid interaction (x_label 1) in the synthetic interactions file."""
    import numpy as np
    rows = np.loadtxt(data / "interactions.inter", dtype=np.int64, skiprows=1, ndmin=2)
    return int(len(np.unique(rows[rows[:, 2] == 1, 0])))


def fit(runs: list[dict]) -> dict:
    """Per step: the least-squares slope of log(seconds) on log(items)."""
    out = {}
    for step in STEPS:
        pts = sorted((r["items"], r["seconds"]) for r in runs
                     if r["step"] == step and r["seconds"] > 0)
        if len(pts) < 2:
            continue
        xs = [math.log(n) for n, _ in pts]
        ys = [math.log(s) for _, s in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / \
            sum((x - mx) ** 2 for x in xs)
        out[step] = {"exponent": round(slope, 3), "sizes": [n for n, _ in pts],
                     "goal": "<= 1.1" if step in LINEAR_GOAL else ""}
    return out


def plot(runs: list[dict], exponents: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for step in STEPS:
        pts = sorted((r["items"], r["seconds"]) for r in runs if r["step"] == step)
        if pts:
            label = f"{step} (slope {exponents[step]['exponent']:.2f})" if step in exponents \
                else step
            ax.loglog(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("items (users = items / 10)")
    ax.set_ylabel("seconds (evaluate: per user)")
    ax.set_title("ptmrec_dist: time per step against catalog size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000", help="item counts, comma-separated")
    ap.add_argument("--work", default=str(ROOT / "out" / "scaling"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", nargs=3, metavar=("STEP", "ITEMS", "WORK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        step, items, work = args.child
        print(json.dumps(child(step, int(items), Path(work))))
        return 0
    runs = []
    for items in (int(s) for s in args.sizes.split(",")):
        work = Path(args.work) / str(items)
        work.mkdir(parents=True, exist_ok=True)
        for step in STEPS:
            done = work / f"{step}.json"
            if done.is_file():
                runs.append(json.loads(done.read_text()))
                continue
            print(f"-- {items} items: {step}", flush=True)
            r = run_child(__file__, step, str(items), str(work))
            done.write_text(json.dumps(r))
            runs.append(r)
    exponents = fit(runs)
    for step, e in exponents.items():
        print(f"{step}: exponent {e['exponent']} over {e['sizes']}", flush=True)
    plot(runs, exponents, Path(args.out) / "scaling.png")
    write_result(args.out, "scaling", {"users_per_item": USERS_PER_ITEM, "runs": runs,
                                       "exponents": exponents})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

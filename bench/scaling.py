"""Catalog scale: time and peak memory of each step of the pipeline at growing catalog sizes
(users scaled alike: one user per ten items, as 1M items x 100k users), the fitted growth
exponent of each step's time against the item count, and a log-log plot.

    .venv/bin/python bench/scaling.py [--sizes 10000,100000] [--work out/scaling]

Steps, each in a fresh process (its own peak RSS), each size's outputs feeding the next step:

* ``make-data``: ``make-data synthetic`` (64 px images, item files, interactions), and
  ``shard``: ``ptmrec shard`` of that catalog (1,000 items per shard): the path of item files,
  run up to ``--file-steps-max`` items (100k);
* ``make-shards``: ``make-data synthetic --shards`` (the items straight into shards from
  parallel processes, no image files; the grouped interaction sampler above 100k items): at
  every size, and what feeds the later steps above ``--file-steps-max``;
* ``extract``: ``ptmrec extract`` with a demo-shaped CLIP (random weights: the speed is the
  shape's) over the shards; stage 2's per-epoch feature-bank refresh runs this same
  ``extract_all`` over the same shards, so its growth is this step's;
* ``knn-graph``: FREEDOM's item-item kNN graph (``rec.graph.knn_graph``, k 10, its default
  ``auto``: exact and chunked up to 100k items, faiss above) on the extracted image features,
  with its recall@10 against the exact neighbours of 2,000 random items;
* ``stage1-epoch``: one vbpr epoch with dense Adam (``ptmrec stage1``,
  ``stage1.sparse_embeddings=false``, the extracted features; the time of the epoch as the run
  records it, not the process); ``stage1-epoch-sparse`` the same with
  ``stage1.sparse_embeddings=true`` (sparse gradients for the ID tables, lazy row-wise Adam;
  what the default ``auto`` takes from 100,000 items);
* ``evaluate-per-user``: the dense run's valid evaluation time divided by its evaluated users
  (full ranking: every user scores every item, so this grows with the catalog; the
  evaluation's memory stays bounded by ``eval.memory_mb``).

The exponent is the least-squares slope of log(seconds) on log(items) (two sizes: the slope
between them). Goal (issue 21): at most 1.1 for shard, make-shards, extract, the stage-1 epoch
and evaluation per user. The exact sampler of ``make-data`` (up to 100k items) scores every item
for every user (users x items: quadratic when users grow with items) and the exact kNN graph
compares every pair of items: both are reported as measured. Sizes below ~10k items carry fixed
costs (process start-up, first-call overheads) that flatten the slope. Resumable: a size and
step whose result exists in ``WORK/<items>/<step>.json`` is not rerun. Writes OUT/scaling.json
and OUT/scaling.png.
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

STEPS = ("make-data", "shard", "make-shards", "extract", "knn-graph", "stage1-epoch",
         "stage1-epoch-sparse", "evaluate-per-user")
LINEAR_GOAL = ("shard", "make-shards", "extract", "stage1-epoch", "stage1-epoch-sparse",
               "evaluate-per-user")
FILE_STEPS = ("make-data", "shard")     # item files, then shards: up to --file-steps-max items
USERS_PER_ITEM = 0.1


def _users(items: int) -> int:
    return max(50, int(items * USERS_PER_ITEM))


def child(step: str, items: int, work: Path) -> dict:
    """Run one step for one size; returns {"seconds", "peak_rss_mb", ...}."""
    import numpy as np
    import torch

    from ptmrec_dist.config import Config, DemoBackboneConfig, SyntheticConfig
    from ptmrec_dist.dist import DistEnv

    # the shards and interactions of the file path where it ran, else those written straight
    # by make-shards (the same bytes: tests/test_synthetic.py)
    files = (work / "shard.json").is_file()
    data = work / ("data" if files else "data-direct")
    shards = work / ("shards" if files else "shards-direct")
    feats = work / "features"
    extra: dict = {}
    if step == "make-shards":
        from ptmrec_dist.data.synthetic import generate
        t0 = time.perf_counter()
        out = generate(SyntheticConfig(n_items=items, n_users=_users(items), seed=0,
                                       image_size=DemoBackboneConfig().image_size),
                       work / "data-direct", shards=work / "shards-direct", shard_size=1000)
        seconds = time.perf_counter() - t0
        extra["sampler"] = out["sampler"]
    elif step == "make-data":
        from ptmrec_dist.data.synthetic import generate
        t0 = time.perf_counter()
        out = generate(SyntheticConfig(n_items=items, n_users=_users(items), seed=0,
                                       image_size=DemoBackboneConfig().image_size), work / "data")
        seconds = time.perf_counter() - t0
        extra["sampler"] = out["sampler"]
    elif step == "shard":
        from ptmrec_dist.data.shards import write_shards
        t0 = time.perf_counter()
        write_shards(work / "data", work / "shards", shard_size=1000, log=lambda m: None)
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
        from graph_scale import recall
        from ptmrec_dist.rec.graph import knn_adjacency, knn_indices, knn_method
        f = torch.from_numpy(np.load(feats / "image.npy").astype(np.float32))
        t0 = time.perf_counter()       # knn_graph's two halves, FREEDOM's default method
        idx = knn_indices(f, 10, method="auto")        # (auto: faiss above 100k items)
        knn_adjacency(idx)
        seconds = time.perf_counter() - t0
        extra["knn_method"] = knn_method("auto", items)
        # the graph's neighbours against the exact ones on 2,000 random items
        extra["knn_recall_at_10"] = round(recall(f, idx, 10, torch.Generator().manual_seed(0)),
                                          4)
    elif step in ("stage1-epoch", "stage1-epoch-sparse", "evaluate-per-user"):
        sparse = step == "stage1-epoch-sparse"
        run = work / ("stage1-sparse" if sparse else "stage1")
        m = run / "metrics.json"
        if not m.is_file():
            from stage1 import stage1
            stage1(run, str(data), "vbpr", str(feats), "stage1.epochs=1",
                   "stage1.patience=1000", "stage1.batch_size=2048",
                   f"stage1.sparse_embeddings={'true' if sparse else 'false'}")
        metrics = json.loads(m.read_text())
        if step.startswith("stage1-epoch"):
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
    ap.add_argument("--file-steps-max", type=int, default=100_000,
                    help="largest catalog for make-data with image files + shard (above it, "
                         "make-shards alone feeds the later steps)")
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
            if step in FILE_STEPS and items > args.file_steps_max:
                continue
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

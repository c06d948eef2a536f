"""``ptmrec demo``: the whole flow on built-in synthetic data, one folder per step.

Layout: ``OUT/data/ OUT/shards/ OUT/backbone/ OUT/features/ OUT/stage1/ OUT/stage2/
OUT/summary.json``, plus the resolved ``OUT/config.yaml`` and ``OUT/log.jsonl`` (one record per
step). Steps: data generation, sharding, statistics, the demo backbone, feature extraction,
stage 1 (``recommender.name``, vbpr by default, next to the ``pop`` baseline), stage 2 (PTMRec:
``peft.method`` on the backbone, the stage-1 run as teacher). ``summary.json`` lists the steps
that ran and the metrics of each stage side by side (frozen features = stage 1 against PTMRec =
stage 2), with parameter counts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np

from ptmrec_dist.config import Config, save_config
from ptmrec_dist.errors import PtmrecError
from ptmrec_dist.io import atomic_write_json
from ptmrec_dist.logs import get_logger
from ptmrec_dist.run import RunDir

_log = get_logger(__name__)

SIZES = {
    # tiny: what tests and quick checks use; default: the demo people run
    "tiny": {"n_items": 300, "n_users": 200, "shard_size": 100, "stage2_epochs": 2},
    "default": {"n_items": 3000, "n_users": 3000, "shard_size": 500, "stage2_epochs": 8},
}
STEPS = 8


def demo_config(size: str) -> Config:
    spec = SIZES[size]
    cfg = Config()
    cfg.synthetic.n_items = spec["n_items"]
    cfg.synthetic.n_users = spec["n_users"]
    cfg.data.shard_size = spec["shard_size"]
    # stage 1 on a few thousand users: larger steps than MMRec's defaults (2048 / 1e-3), chosen
    # on the demo's valid split; the file and overrides still come on top
    cfg.stage1.batch_size = 512
    cfg.stage1.lr = 0.005
    # stage 2: 8 epochs (about 40 s each at the default size) keep the demo under 15 minutes
    cfg.stage2.epochs = spec["stage2_epochs"]
    return cfg


def prepare_inputs(cfg: Config, out: Path, run: RunDir, log=None,
                   show=None) -> tuple[dict, dict]:
    """Steps 1-5 (data, shards, statistics, backbone, frozen features); sets
    ``cfg.backbone.name_or_path`` and ``cfg.data.shards``. Returns ``(steps, stats)``.
    ``bench/ablation.py`` prepares its benchmark with it too. ``log``: the messages (default:
    this module's logger; each step's own logger for what the steps say), ``show``: the
    statistics table (default: ``log``; ``ptmrec demo`` prints it to stdout)."""
    say = log or _log.info
    show = show or say
    from ptmrec_dist.clip.demo_backbone import build_demo_backbone
    from ptmrec_dist.clip.extract import run_extract
    from ptmrec_dist.dist import DistEnv
    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.data.shards import write_shards
    from ptmrec_dist.data.stats import format_stats
    from ptmrec_dist.data.synthetic import generate

    steps: dict[str, dict] = {}

    t0 = time.perf_counter()
    say(f"[1/{STEPS}] synthetic data: {cfg.synthetic.n_items} items x "
        f"{cfg.synthetic.n_users} users -> {out / 'data'}")
    gen = generate(cfg.synthetic, out / "data", split_seed=cfg.data.split_seed, progress=True)
    save_config(cfg, out / "data")
    steps["data"] = {"dir": "data", "seconds": round(time.perf_counter() - t0, 2),
                     "n_interactions": gen["n_interactions"]}
    run.log(step="data", **steps["data"])

    t0 = time.perf_counter()
    say(f"[2/{STEPS}] shards: {cfg.data.shard_size} items per shard -> {out / 'shards'}")
    manifest = write_shards(out / "data", out / "shards", shard_size=cfg.data.shard_size,
                            image_size=cfg.data.image_size, on_bad_sample=cfg.data.on_bad_sample,
                            quality=cfg.data.jpeg_quality)
    save_config(cfg, out / "shards")
    steps["shards"] = {"dir": "shards", "seconds": round(time.perf_counter() - t0, 2),
                       "n_shards": len(manifest["shards"]), "n_written": manifest["n_written"],
                       "bytes": sum(s["bytes"] for s in manifest["shards"]),
                       "skipped": manifest["skipped"]["total"]}
    run.log(step="shards", **steps["shards"])

    say(f"[3/{STEPS}] statistics")
    stats = load_interactions(out / "data", cfg.data).stats()
    show(format_stats(stats))

    t0 = time.perf_counter()
    corpus = pretraining_corpus(cfg, out, say)
    say(f"[4/{STEPS}] demo backbone: pretraining a small CLIP on generic captions of "
        f"{corpus} -> {out / 'backbone'}")
    backbone = build_demo_backbone(corpus, out / "backbone", cfg.demo_backbone,
                                   seed=cfg.seed, log=log)
    save_config(cfg, out / "backbone")
    steps["backbone"] = {"dir": "backbone", "seconds": round(time.perf_counter() - t0, 2),
                         "corpus": str(corpus.relative_to(out)),
                         "heldout": backbone.get("heldout")}
    run.log(step="backbone", **steps["backbone"])

    t0 = time.perf_counter()
    say(f"[5/{STEPS}] features: frozen backbone over the shards -> {out / 'features'}")
    cfg.backbone.name_or_path = str(out / "backbone")
    cfg.data.shards = str(out / "shards")
    save_config(cfg, out)
    meta = run_extract(cfg, out / "shards", out / "features", DistEnv(), log=log)
    steps["features"] = {"dir": "features", "seconds": round(time.perf_counter() - t0, 2),
                         **{k: meta[k] for k in ("n_present", "image_dim", "text_dim", "dtype")}}
    run.log(step="features", **steps["features"])
    return steps, stats


CORPUS_SEED = 1_000_000      # the pretraining corpus is synthetic.seed + CORPUS_SEED


def pretraining_corpus(cfg: Config, out: Path, say) -> Path:
    """Where the demo backbone pretrains: the catalog itself (``OUT/data``) when
    ``demo_backbone.corpus_items`` is 0, else a separate synthetic corpus of that many items
    (``OUT/corpus``): the same generator and caption rules (``synthetic.*``: image size,
    ``caption_mention_prob``), its own items (``synthetic.seed + CORPUS_SEED``), as a CLIP is
    pretrained on web pairs, not on the catalog it is later used for. Pretraining reads the
    corpus's items, images, captions and truth.json; its users and interactions are a token
    one user that nothing reads."""
    n = cfg.demo_backbone.corpus_items
    if not n:
        return out / "data"
    from ptmrec_dist.data.synthetic import generate

    corpus = dataclasses.replace(cfg.synthetic, n_items=n, n_users=1, min_interactions=3,
                                 mean_interactions=3.0, seed=cfg.synthetic.seed + CORPUS_SEED)
    say(f"[4/{STEPS}] pretraining corpus: {n} synthetic items (seed {corpus.seed}) -> "
        f"{out / 'corpus'}")
    generate(corpus, out / "corpus", split_seed=cfg.data.split_seed)
    return out / "corpus"


def run_demo(cfg: Config, out: Path, size: str, log=None, show=None) -> dict:
    """The whole demo; returns ``summary.json``'s content. ``log``: the messages (default: this
    module's logger; each step's own logger for what the steps say), ``show``: the statistics
    and the stage table, the demo's results (default: ``log``; ``ptmrec demo`` prints them to
    stdout)."""
    from ptmrec_dist.train.stage1 import run_stage1
    from ptmrec_dist.train.stage2 import run_stage2

    say = log or _log.info
    show = show or say
    run = RunDir(out, cfg).start()
    steps, stats = prepare_inputs(cfg, out, run, log, show)
    stages = {}
    runs = [("stage1-pop", "pop")] if cfg.recommender.name != "pop" else []
    for i, (folder, model) in enumerate(runs + [("stage1", cfg.recommender.name)], start=6):
        t0 = time.perf_counter()
        say(f"[{i}/{STEPS}] stage 1: {model} -> {out / folder}")
        s1 = copy.deepcopy(cfg)
        s1.recommender.name = model
        s1.data.path = str(out / "data")
        s1.data.features = str(out / "features")
        m = run_stage1(s1, out / folder, log=log)
        stages[folder] = {"model": model, "method": "frozen features",
                          "best_epoch": m["best_epoch"],
                          "valid": _headline(m["valid"]), "test": _headline(m["test"]),
                          "trainable_params": m["trainable_params"]}
        steps[folder] = {"dir": folder, "seconds": round(time.perf_counter() - t0, 2)}
        run.log(step=folder, **steps[folder], **stages[folder])

    if cfg.recommender.name in ("vbpr", "freedom", "bm3"):
        t0 = time.perf_counter()
        say(f"[{STEPS}/{STEPS}] stage 2: PTMRec ({cfg.peft.method}, teacher {out / 'stage1'}) "
            f"-> {out / 'stage2'}")
        s2 = copy.deepcopy(cfg)
        # the demo builds its own backbone: prompts go at most as deep as it has layers
        s2.stage2.prompt_depth = min(s2.stage2.prompt_depth, cfg.demo_backbone.layers)
        s2.data.path = str(out / "data")
        s2.data.features = str(out / "features")
        s2.stage2.teacher = str(out / "stage1")
        m = run_stage2(s2, out / "stage2", log=log)
        stages["stage2"] = {"model": cfg.recommender.name, "method": f"ptmrec {m['method']}",
                            "best_epoch": m["best_epoch"], "valid": _headline(m["valid"]),
                            "test": _headline(m["test"]),
                            "trainable_params": m["trainable_params"],
                            "backbone_params": m["params"]["backbone"]}
        stages["stage2"]["vs_stage1"] = paired_vs_stage1(out)
        steps["stage2"] = {"dir": "stage2", "seconds": round(time.perf_counter() - t0, 2)}
        run.log(step="stage2", **steps["stage2"], **stages["stage2"])
    else:
        say(f"[{STEPS}/{STEPS}] stage 2 skipped: recommender.name={cfg.recommender.name} has no "
            "modal inputs to adapt (use vbpr, freedom or bm3)")
    show(format_stage_table(stages))

    summary = {"size": size, "data": stats, "steps": steps,
               "not_yet_available": [],
               "stages": stages}   # stage results side by side
    atomic_write_json(out / "summary.json", summary)
    say(f"summary: {out / 'summary.json'}")
    return summary


HEADLINE = ("recall@10", "recall@20", "ndcg@20", "recall@50")


def paired_vs_stage1(out: Path) -> dict:
    """Stage 2 minus stage 1 on test Recall@20, per user (the same users and split), with a 95 %
    bootstrap interval over users: one run each, so it says how sure the comparison is about
    these users, not about other seeds."""
    from ptmrec_dist.eval.evaluate import paired_user_interval, per_user_metrics

    a = per_user_metrics(out / "stage2", "test", ("recall@20",))
    b = per_user_metrics(out / "stage1", "test", ("recall@20",))
    if not np.array_equal(a["users"], b["users"]):
        raise PtmrecError("stage 1 and stage 2 were evaluated on different users")
    return paired_user_interval(a["recall@20"], b["recall@20"])


def _headline(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in HEADLINE}


def format_stage_table(stages: dict) -> str:
    """Test metrics side by side: the frozen-feature runs (stage 1) and PTMRec (stage 2)."""
    lines = [f"{'run':<12s}{'model':<8s}{'method':<18s}{'trainable':>11s}  "
             + "".join(f"test {k:<11s}" for k in HEADLINE)]
    for folder, r in stages.items():
        lines.append(f"{folder:<12s}{r['model']:<8s}{r['method']:<18s}"
                     f"{r['trainable_params']:>11,d}  "
                     + "".join(f"{r['test'][k]:<16.4f}" for k in HEADLINE))
    if "stage2" in stages and "stage1" in stages:
        base = stages["stage1"]["test"]["recall@20"]
        gain = stages["stage2"]["test"]["recall@20"] / base - 1 if base else float("nan")
        bb = stages["stage2"]["backbone_params"]
        lines.append(f"PTMRec vs frozen features: test recall@20 {gain:+.1%}; backbone "
                     f"parameters trained {bb['trainable']:,d} of {bb['total']:,d} "
                     f"({bb['trainable_pct']}%)")
        pair, kept = stages["stage2"].get("vs_stage1"), stages["stage2"]["best_epoch"]
        if pair:
            lines.append(f"  paired over {pair['n_users']} test users: recall@20 difference "
                         f"{pair['mean_diff']:+.4f}, 95 % interval [{pair['ci95'][0]:+.4f}, "
                         f"{pair['ci95'][1]:+.4f}] (one seed: other seeds vary more)")
        lines.append(f"  stage 2 kept epoch {kept}"
                     + (" (the state before training: no trained epoch beat it on valid)"
                        if kept == -1 else ""))
    return "\n".join(lines)


__all__ = ["SIZES", "demo_config", "prepare_inputs", "run_demo"]

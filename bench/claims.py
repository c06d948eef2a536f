"""The paper's claims under paired statistics (issue 18): every arm over data seeds x
initialisation seeds on the synthetic benchmark, test metrics at the best-valid epoch, per-user
paired bootstrap intervals, a paired test per claim with Holm's correction.

    .venv/bin/python bench/claims.py [--design v2] [--data-seeds 0 1 2] [--inits 0 1 2 3]
        [--control-inits 0 1] [--models vbpr freedom] [--items N --users 1600]
        [--arms ...] [--work out/claims-DESIGN] [--inputs WORK2] [k=v ...]

* **Design** (``DESIGNS``): the synthetic benchmark's version, its item count and the overrides
  of every input. ``v1``: the generator's defaults, 800 items. ``v2`` (the default): 2,400
  items, the demo backbone pretrained on a separate corpus of 4,000 items whose captions name
  each hidden attribute with probability 0.1; chosen on valid by ``bench/redesign.py``.
  Inputs already in the work folder that were built with other settings are refused.

* **Arms** are ``configs/ablations/<arm>.yaml`` (``frozen`` is stage 1 and every two-stage arm's
  teacher), plus ``stage1-on-adapted``: stage 1 retrained from scratch on the ``ptmrec`` run's
  exported features (are the features themselves better?), and the **headroom** arms, stage 1
  on features that encode exactly some true attributes (``_util.attribute_features``):
  ``oracle`` (every attribute each modality shows; ``oracle-unit``: the same at row norm 1, the
  others at the frozen features' mean norm) and ``caption-visible`` (only those the backbone's
  pretraining captions name). oracle - frozen is the gap an encoder could close;
  the headroom table puts ptmrec - frozen next to it (share of the gap closed), and reports
  (without correction, not claims) what each part of stage 2 does alone: frozen-backbone-kt -
  frozen (the recommender trained on), prompts-only - frozen (the adapted features, the
  recommender frozen), stage1-on-adapted - frozen (stage 1 on the adapted features), and the
  controls' own comparisons: two-stage-full-kt - frozen and ptmrec - two-stage-full-kt (full
  fine-tuning in PTMRec's two stages, against frozen and against prompts; and against
  frozen-backbone-kt: claim 2's question with full tuning), joint-frozen - frozen (one-stage
  training itself) and joint-full - joint-frozen (what fine-tuning adds to one stage). Each
  arm's row has the standard error of one run's test Recall@20 over its users, relative to the
  value (``se_rel_pct``; the power target is at most 3 %). Two rankings that need no training
  bound every arm, per data seed (``references``): each user's true utility from truth.json
  (the ceiling) and training popularity (the floor).
* **Seeds.** Data seed ``d`` generates the synthetic set (``synthetic.seed=d``; its own split,
  ``data.split_seed=2026+d``), shards it and pretrains its demo backbone; init seed ``s`` is the
  run's ``seed`` (initialisation, sampling). The headline pair (``frozen``, ``ptmrec``) runs
  every ``--inits`` for every data seed; the controls run ``--control-inits``.
* **Per run**: ``metrics.json`` (test at the best-valid epoch, ``best_epoch``, whether epoch -1
  was kept, provenance: commit, threads, versions) and the test split's per-user Recall@20 /
  NDCG@20 (``per_user.npz``, from the run's representations; their means are checked against
  ``metrics.json``).
* **Claims** (A vs B on test Recall@20, runs paired by (data seed, init seed)): (1) ptmrec >
  frozen; (2) ptmrec > frozen-backbone-kt (the gain comes from the backbone); (3) ptmrec >
  ptmrec-no-kt; (4) ptmrec > joint-prompt (two stages > one); (5) joint-full > frozen, expected
  *not* to hold; (6) ptmrec's gain over frozen is larger for vbpr than for freedom (difference of
  differences). The effect is the mean paired difference relative to B; its 95 % interval is a
  bootstrap over users (resampled within each data seed, the same users for both arms) and over
  runs; the p-value is a one-sided paired t-test over runs, Holm-corrected over the claims.
* **Run settings** (``key=value`` before ``--arms``) apply to every run, under each arm's file:
  the one-stage arms' files pin ``stage2.passes_per_epoch: 1`` and ``feature_gate: false``, so
  the two-stage lead's knobs do not change them (one stage keeps stage 1's epoch).
* **Shared inputs** (``--inputs WORK2``): the runs go under ``--work`` and read the inputs of
  ``WORK2/data<d>/inputs`` (built there if missing): a run setting compared on the same inputs
  as another work folder's runs, without rebuilding them and without mixing the runs.
* **Inputs fingerprint** (``inputs_fingerprint`` in the JSON, per data seed): sha256 of the
  data, the demo backbone's weights and the frozen features. Figures are comparable within one
  set of inputs; two machines that disagree here built different inputs (docs/stage2.md).
* A finished run (its ``bench.json``) is reused and an unfinished one continues from its newest
  epoch checkpoint: an interrupted bench resumes run by run, and within a run.

Writes ``OUT/claims.json``, a Markdown table (printed) and ``OUT/claims.png``.
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

from _util import (ABLATIONS, HEADROOM, ablation_kind, attribute_features, quiet,  # noqa: E402
                   resumable, write_result)

HEADLINE = ("frozen", "ptmrec")
CONTROLS = ("frozen-backbone-kt", "ptmrec-no-kt", "joint-prompt", "joint-full", "prompts-only",
            "two-stage-full-kt", "joint-frozen", "stage1-on-adapted")
METRIC = "recall@20"
PER_USER = ("recall@20", "ndcg@20")
CLAIMS = [  # (id, statement, A, B, expected to hold)
    (1, "PTMRec beats frozen features", "ptmrec", "frozen", True),
    (2, "the gain comes from adapting the backbone", "ptmrec", "frozen-backbone-kt", True),
    (3, "knowledge transfer helps", "ptmrec", "ptmrec-no-kt", True),
    (4, "two stages beat one", "ptmrec", "joint-prompt", True),
    (5, "joint full fine-tuning beats frozen", "joint-full", "frozen", False),
]
BOOTSTRAP = 2000


def kind(arm: str) -> str:
    if arm == "stage1-on-adapted":
        return "retrain"
    if arm in HEADROOM:
        return "headroom"
    return ablation_kind(arm)


INPUT_PARTS = ("data", "synthetic", "backbone", "demo_backbone", "extract")   # build the inputs
BUILT = (("data", "path"), ("data", "shards"), ("data", "features"),   # what building them
         ("backbone", "name_or_path"))                                  # sets: where they are


def prepare(work: Path, data_seed: int, items: int, users: int, overrides: list[str]):
    """One data seed's inputs (data, shards, demo backbone, frozen features), built once; inputs
    already under WORK that were built with other input settings (``INPUT_PARTS``) are refused
    (another design or size needs another ``--work``). The inputs record only input settings:
    the run settings of the config returned (``stage2.*``, ``peft.*``, ...) are this call's
    overrides on the defaults, whichever call built the inputs."""
    import dataclasses

    from ptmrec_dist.config import load_config, save_config
    from ptmrec_dist.demo import demo_config, prepare_inputs
    from ptmrec_dist.run import RunDir

    given: dict[bool, list[str]] = {True: [], False: []}     # input settings or run settings
    for o in overrides:
        given[o.split("=", 1)[0].split(".", 1)[0] in INPUT_PARTS].append(o)
    runs = given[False]
    inputs = work / f"data{data_seed}" / "inputs"
    done = inputs / "prepared.yaml"
    cfg = load_config(None, [f"synthetic.n_items={items}", f"synthetic.n_users={users}",
                             f"synthetic.seed={data_seed}", f"data.split_seed={2026 + data_seed}",
                             *given[True]],
                      base=demo_config("default"))
    if done.is_file():
        have = load_config(done)
        differ = [f"{name}.{k}: {v!r} there, {getattr(getattr(cfg, name), k)!r} asked"
                  for name in INPUT_PARTS
                  for k, v in dataclasses.asdict(getattr(have, name)).items()
                  if getattr(getattr(cfg, name), k) != v and (name, k) not in BUILT]
        if differ:
            raise SystemExit(f"{done}: these inputs were built with other settings ("
                             + "; ".join(differ) + "): use another --work")
        for name, k in BUILT:
            setattr(getattr(cfg, name), k, getattr(getattr(have, name), k))
        return load_config(None, runs, base=cfg)
    prepare_inputs(cfg, inputs, RunDir(inputs, cfg).start(), log=print)
    cfg.data.path, cfg.data.features = str(inputs / "data"), str(inputs / "features")
    save_config(cfg, inputs)
    (inputs / "config.yaml").rename(done)
    return load_config(None, runs, base=cfg)


FINGERPRINT = {  # input part -> the files whose bytes define it (paths and logs left out)
    "data": ("interactions.inter", "items.jsonl", "captions.jsonl", "truth.json", "images/*"),
    "backbone": ("model.safetensors",),
    "features": ("*.npy",),
}


def inputs_fingerprint(inputs: Path) -> dict[str, str]:
    """sha256 per built input part of one data seed (``FINGERPRINT``): the synthetic data, the
    pretrained demo backbone's weights and the frozen features. Two machines built the same
    inputs exactly when these agree; the same commit and settings rebuild them bit for bit on
    one machine, and figures are comparable only within one set of inputs (docs/stage2.md)."""
    import hashlib

    out = {}
    for part, patterns in FINGERPRINT.items():
        h = hashlib.sha256()
        files = sorted({f for pat in patterns for f in (inputs / part).glob(pat) if f.is_file()})
        if not files:
            raise SystemExit(f"{inputs / part}: none of {', '.join(patterns)} found to "
                             "fingerprint (inputs not built?)")
        for f in files:
            h.update(f.relative_to(inputs).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        out[part] = h.hexdigest()
    return out


def reference_scores(cfg) -> dict:
    """Test Recall@20 / NDCG@20 of two rankings that need no training, on one data seed: every
    user's true utility (truth.json: the generator's preferences, attributes and popularity; the
    ceiling of any recommender in expectation) and training popularity (the floor)."""
    import torch

    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.data.synthetic import utility
    from ptmrec_dist.eval.metrics import evaluate

    inter = load_interactions(cfg.data.path, cfg.data, warn=lambda _m: None)
    truth = json.loads((Path(cfg.data.path) / "truth.json").read_text())
    items = inter.item_ids.astype(int) if inter.item_ids is not None else \
        np.arange(inter.n_items)
    users = inter.user_ids.astype(int) if inter.user_ids is not None else \
        np.arange(inter.n_users)
    prefs = {a: np.asarray(v) for a, v in truth["user_preferences"].items()}
    attrs = {a: np.asarray(v)[items] for a, v in truth["item_attributes"].items()}
    log_pop = np.log(np.asarray(truth["popularity"]))[items]
    true_u = torch.as_tensor(utility(prefs, attrs, log_pop, truth["popularity_weight"], users),
                             dtype=torch.float32)
    pop = torch.as_tensor(np.asarray(inter.train.sum(0)).ravel(), dtype=torch.float32)
    out = {}
    for name, fn in (("true-utility", lambda u: true_u[u].clone()),
                     ("pop", lambda u: pop.expand(len(u), -1).clone())):
        m = evaluate(fn, inter.train, inter.test, [20], also_mask=inter.valid)
        out[name] = {k: float(m[k]) for k in PER_USER}
    return out


def run_dir(work: Path, data_seed: int, model: str, seed: int, arm: str) -> Path:
    return work / f"data{data_seed}" / model / f"seed{seed}" / arm


def per_user(run: Path) -> dict[str, np.ndarray]:
    from ptmrec_dist.eval.evaluate import per_user_metrics
    return per_user_metrics(run, "test", PER_USER)


def run_one(base, work: Path, data_seed: int, model: str, seed: int, arm: str) -> dict:
    from ptmrec_dist.config import load_config
    from ptmrec_dist.train.stage1 import run_stage1
    from ptmrec_dist.train.stage2 import run_stage2

    out = run_dir(work, data_seed, model, seed, arm)

    def run() -> dict:
        if arm == "stage1-on-adapted":
            run_one(base, work, data_seed, model, seed, "ptmrec")
            cfg = copy.deepcopy(base)
            cfg.data.features = str(run_dir(work, data_seed, model, seed, "ptmrec") / "features")
            arm_cfg = ABLATIONS / "frozen.yaml"
        elif arm in HEADROOM:      # stage 1 on features that encode chosen true attributes
            cfg = copy.deepcopy(base)
            cfg.data.features = str(attribute_features(
                Path(base.data.path), Path(base.data.features),
                work / f"data{data_seed}" / "inputs" / f"features-{arm}", *HEADROOM[arm]))
            arm_cfg = ABLATIONS / "frozen.yaml"
        else:
            cfg, arm_cfg = copy.deepcopy(base), ABLATIONS / f"{arm}.yaml"
        cfg.seed, cfg.recommender.name = seed, model
        extra = []
        if kind(arm) == "two-stage":
            run_one(base, work, data_seed, model, seed, "frozen")
            extra.append(f"stage2.teacher={run_dir(work, data_seed, model, seed, 'frozen')}")
        cfg = load_config(arm_cfg, extra, base=cfg)
        stage1 = kind(arm) in ("stage1", "retrain", "headroom")
        # resume: a run cut short continues from its newest epoch checkpoint (a one-stage
        # arm trained to convergence takes long here), from scratch when there is none
        m = (run_stage1 if stage1 else run_stage2)(cfg, out, log=quiet, resume=True)
        np.savez(out / "per_user.npz", **per_user(out))
        return dict(m, epoch_minus1_kept=m["best_epoch"] == -1)
    return resumable(out, f"data {data_seed} {model} seed {seed} {arm}", run)


def load_runs(work: Path, models, data_seeds, arms) -> dict:
    """{(model, arm): {(data seed, init seed): (metrics, per-user arrays)}} of finished runs."""
    runs: dict = {}
    for d in data_seeds:
        for model in models:
            for path in sorted((work / f"data{d}" / model).glob("seed*/*/bench.json")):
                arm, seed = path.parent.name, int(path.parent.parent.name[4:])
                if arm not in arms:
                    continue
                pu = dict(np.load(path.parent / "per_user.npz"))
                runs.setdefault((model, arm), {})[(d, seed)] = (json.loads(path.read_text()), pu)
    return runs


def paired(runs: dict, a: tuple, b: tuple, rng) -> dict | None:
    """Mean paired difference a - b of test Recall@20 relative to b, its bootstrap interval
    (users resampled within each data seed, then runs), and a one-sided paired t-test."""
    from scipy import stats

    keys = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if len(keys) < 2:
        return None
    diffs = np.array([runs[a][k][0]["test"][METRIC] - runs[b][k][0]["test"][METRIC]
                      for k in keys])
    base = np.mean([runs[b][k][0]["test"][METRIC] for k in keys])
    per_user_diff = [runs[a][k][1][METRIC] - runs[b][k][1][METRIC] for k in keys]
    boot = np.empty(BOOTSTRAP)
    for r in range(BOOTSTRAP):
        pick = rng.integers(len(keys), size=len(keys))                     # runs
        boot[r] = np.mean([per_user_diff[i][rng.integers(len(per_user_diff[i]),
                                                         size=len(per_user_diff[i]))].mean()
                           for i in pick])
    t = stats.ttest_1samp(diffs, 0.0, alternative="greater")
    return {"n_runs": len(keys), "mean_diff": float(diffs.mean()),
            "relative_pct": float(100 * diffs.mean() / base),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "p_one_sided": float(t.pvalue), "runs": [list(k) for k in keys]}


def holm(pvalues: dict) -> dict:
    """Holm-adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        out[key] = running
    return out


def evaluate_claims(runs: dict, models: list[str]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for model in models:
        for cid, text, a, b, expected in CLAIMS:
            res = paired(runs, (model, a), (model, b), rng)
            rows.append({"claim": cid, "model": model, "statement": text, "a": a, "b": b,
                         "expected": expected, **(res or {"n_runs": 0})})
    if {"vbpr", "freedom"} <= set(models):
        rows.append(difference_of_differences(runs, rng))
    tested = {i: r["p_one_sided"] for i, r in enumerate(rows) if "p_one_sided" in r}
    for i, p in holm(tested).items():
        rows[i]["p_holm"] = p
        holds = p < 0.05 and rows[i]["ci95"][0] > 0
        rows[i]["verdict"] = "holds" if holds else "not shown"
    return rows


HEADROOM_ROWS = [  # (A, B, what A - B measures); reported, not claims: no correction
    ("oracle", "frozen", "the gap: a perfect encoder of what each modality shows vs frozen"),
    ("oracle-unit", "frozen", "the same gap with the oracle codes at unit row norm"),
    ("frozen", "caption-visible", "what frozen features carry beyond the caption attributes"),
    ("stage1-on-adapted", "frozen", "stage 1 retrained on PTMRec's features: better features?"),
    ("frozen-backbone-kt", "frozen", "stage 2 with nothing in the backbone trained: the "
                                     "recommender trained on"),
    ("prompts-only", "frozen", "stage 2 with the recommender frozen: the adapted features alone"),
    ("two-stage-full-kt", "frozen", "stage 2 with the whole backbone fine-tuned instead of "
                                    "prompts"),
    ("ptmrec", "two-stage-full-kt", "prompts against full fine-tuning in the same two stages"),
    ("two-stage-full-kt", "frozen-backbone-kt", "what fine-tuning the whole backbone adds "
                                                "to the recommender trained on (claim 2's "
                                                "question with full tuning)"),
    ("joint-frozen", "frozen", "one stage with nothing in the backbone trained against stage 1: "
                               "one-stage training itself"),
    ("joint-full", "joint-frozen", "what fine-tuning the backbone adds to one stage"),
    ("ptmrec", "frozen", "PTMRec's gain (claim 1), as a share of the gap"),       # keep last
]


def evaluate_headroom(runs: dict, models: list[str]) -> list[dict]:
    """The headroom rows: paired differences as for the claims, and for ptmrec the share of the
    oracle gap closed (mean gain / the larger of the oracle arms' mean gaps)."""
    rng = np.random.default_rng(1)
    rows = []
    for model in models:
        for a, b, text in HEADROOM_ROWS:
            res = paired(runs, (model, a), (model, b), rng)
            rows.append({"model": model, "a": a, "b": b, "measures": text,
                         **(res or {"n_runs": 0})})
        mine, gain = rows[-len(HEADROOM_ROWS):], rows[-1]
        gaps = [r for r in mine if HEADROOM.get(r["a"], ("",))[0] == "visible"
                and "mean_diff" in r]                   # the oracle rows: the larger gap counts
        gap = max(gaps, key=lambda r: r["mean_diff"], default=None)
        if gap is not None and "mean_diff" in gain and gap["mean_diff"] > 0:
            gain["share_of_gap"] = gain["mean_diff"] / gap["mean_diff"]
            gain["gap_arm"] = gap["a"]
    return rows


def difference_of_differences(runs: dict, rng) -> dict:
    """Claim 6: ptmrec's gain over frozen, vbpr minus freedom, per matched (data, init) seed."""
    from scipy import stats

    gain = {}
    for model in ("vbpr", "freedom"):
        a, b = runs.get((model, "ptmrec"), {}), runs.get((model, "frozen"), {})
        gain[model] = {k: a[k][0]["test"][METRIC] - b[k][0]["test"][METRIC]
                       for k in set(a) & set(b)}
    keys = sorted(set(gain["vbpr"]) & set(gain["freedom"]))
    row = {"claim": 6, "model": "vbpr vs freedom", "expected": True,
           "statement": "gains are larger for the simpler base model", "n_runs": len(keys)}
    if len(keys) < 2:
        return row
    d = np.array([gain["vbpr"][k] - gain["freedom"][k] for k in keys])
    boot = [d[rng.integers(len(d), size=len(d))].mean() for _ in range(BOOTSTRAP)]
    return {**row, "mean_diff": float(d.mean()), "relative_pct": None,
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "p_one_sided": float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue),
            "runs": [list(k) for k in keys]}


def arm_table(runs: dict) -> dict:
    table = {}
    for (model, arm), rs in sorted(runs.items()):
        ms = [m for m, _ in rs.values()]
        v = [m["test"][METRIC] for m in ms]
        table[f"{model}/{arm}"] = {
            "n": len(ms), "mean": float(np.mean(v)), "std": float(np.std(v)),
            "best_epochs": [m["best_epoch"] for m in ms],
            "epoch_minus1_kept": sum(bool(m.get("epoch_minus1_kept")) for m in ms),
            # standard error of one run's test Recall@20 over its users, relative to its value
            # (issue 18's power target: at most 3 %)
            "se_rel_pct": float(np.mean([100 * pu[METRIC].std(ddof=1) / np.sqrt(len(pu[METRIC]))
                                         / max(pu[METRIC].mean(), 1e-12)
                                         for _, pu in rs.values()])),
            "test_users": sorted({len(pu[METRIC]) for _, pu in rs.values()}),
            "threads": sorted({m.get("provenance", {}).get("torch_threads") for m in ms}),
            "commits": sorted({str(m.get("provenance", {}).get("commit"))[:10] for m in ms})}
    return table


def markdown(table: dict, claims: list[dict], headroom: list[dict] | None = None,
             references: dict | None = None) -> str:
    lines = [f"| arm | runs | test {METRIC} | SE / value | best epochs | epoch -1 kept |",
             "|---|---|---|---|---|---|"]
    for name in ("true-utility", "pop"):                 # no training: one value per data seed
        values = [r[name][METRIC] for r in (references or {}).values()]
        if values:
            lines.append(f"| {name} ranking | {len(values)} | {np.mean(values):.4f} ± "
                         f"{np.std(values):.4f} | - | - | - |")
    for key, r in table.items():
        se = f"{r['se_rel_pct']:.1f} %" if "se_rel_pct" in r else "-"
        lines.append(f"| {key} | {r['n']} | {r['mean']:.4f} ± {r['std']:.4f} | {se} | "
                     f"{r['best_epochs']} | {r['epoch_minus1_kept']} |")
    if headroom:
        lines += ["", "| headroom (no correction) | model | runs | A - B (rel.) | 95 % CI | "
                  "share of gap |", "|---|---|---|---|---|---|"]
        for h in headroom:
            if "mean_diff" not in h:
                lines.append(f"| {h['a']} - {h['b']} | {h['model']} | {h['n_runs']} | - | - | - |")
                continue
            share = f"{100 * h['share_of_gap']:.0f} %" if "share_of_gap" in h else "-"
            lines.append(f"| {h['a']} - {h['b']} | {h['model']} | {h['n_runs']} | "
                         f"{h['mean_diff']:+.4f} ({h['relative_pct']:+.1f} %) | "
                         f"[{h['ci95'][0]:+.4f}, {h['ci95'][1]:+.4f}] | {share} |")
    lines += ["", "| claim | model | A vs B | runs | A - B (rel.) | 95 % CI | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        if "mean_diff" not in c:
            lines.append(f"| {c['claim']} {c['statement']} | {c['model']} | "
                         f"{c.get('a', '')} vs {c.get('b', '')} | {c['n_runs']} | - | - | - | "
                         "too few runs |")
            continue
        rel = f" ({c['relative_pct']:+.1f} %)" if c.get("relative_pct") is not None else ""
        lines.append(f"| {c['claim']} {c['statement']} | {c['model']} | {c.get('a', 'gain')} vs "
                     f"{c.get('b', 'gain')} | {c['n_runs']} | {c['mean_diff']:+.4f}{rel} | "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
                     f"{c.get('p_holm', float('nan')):.3g} | {c.get('verdict', '-')} |")
    return "\n".join(lines)


def plot(claims: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in claims if "mean_diff" in c]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(shown) + 1))
    for i, c in enumerate(shown):
        ax.plot(c["ci95"], [i, i], color="tab:blue")
        ax.plot([c["mean_diff"]], [i], "o", color="tab:blue")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"({c['claim']}) {c['model']}: {c.get('a', 'gain')} - "
                        f"{c.get('b', 'gain')}" for c in shown], fontsize=8)
    ax.set_xlabel(f"paired difference in test {METRIC} (95 % bootstrap interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# versions of the synthetic benchmark's design: (items, overrides of every input); users 1,600.
# v1: the generator's defaults on 800 items; v2: chosen on valid by bench/redesign.py (a
# pretraining corpus of 4,000 items whose captions name each hidden attribute with probability
# 0.1, and 2,400 items: about 8 interactions per item; docs/stage2.md, "The redesign")
DESIGNS = {
    "v1": (800, []),
    "v2": (2400, ["demo_backbone.corpus_items=4000", "synthetic.caption_mention_prob=0.1"]),
}


def input_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that name one set of inputs (results, work folder, design, size, data
    seeds), shared with bench/probe_adapt.py and bench/redesign.py, which read the same inputs;
    ``resolve_inputs`` completes them after parsing."""
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None, help="default: out/claims-DESIGN")
    ap.add_argument("--design", choices=list(DESIGNS), default="v2",
                    help="the synthetic benchmark's version (its items and input overrides)")
    ap.add_argument("--items", type=int, default=None, help="default: the design's")
    ap.add_argument("--users", type=int, default=1600)
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
    return ap


def resolve_inputs(args: argparse.Namespace) -> argparse.Namespace:
    """The design's item count (unless ``--items``) and its overrides before the command
    line's; the work folder ``out/claims-DESIGN`` unless ``--work``."""
    items, overrides = DESIGNS[args.design]
    args.items = items if args.items is None else args.items
    args.overrides = [*overrides, *args.overrides]
    args.work = args.work or str(ROOT / "out" / f"claims-{args.design}")
    return args


def inputs_record(args: argparse.Namespace) -> dict:
    """What a result JSON records of its inputs (the options of ``input_args``)."""
    return {"design": args.design, "items": args.items, "users": args.users,
            "data_seeds": args.data_seeds, "overrides": args.overrides}


def main() -> int:
    ap = input_args(argparse.ArgumentParser())
    ap.add_argument("--inits", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--control-inits", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--models", nargs="+", default=["vbpr", "freedom"])
    ap.add_argument("--arms", nargs="+", default=list(HEADLINE + tuple(HEADROOM) + CONTROLS))
    ap.add_argument("--inputs", default=None,
                    help="the work folder whose data<d>/inputs every run shares (another "
                         "run setting on the same inputs without rebuilding them; the runs "
                         "go under --work); default: --work's own")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = resolve_inputs(ap.parse_args())
    unknown = [a for a in args.arms if a not in HEADLINE + CONTROLS + tuple(HEADROOM) and
               not (ABLATIONS / f"{a}.yaml").is_file()]
    if unknown:
        ap.error(f"unknown arm(s) {unknown} (configs/ablations/ names, stage1-on-adapted, "
                 f"{', '.join(HEADROOM)}; "
                 "key=value overrides go before --arms)")
    import torch
    torch.set_num_threads(2)
    work = Path(args.work)
    inputs = Path(args.inputs or work)
    if args.inputs and inputs.resolve() == work.resolve():
        ap.error("--inputs names --work itself: leave it out")
    t0 = time.perf_counter()
    references, fingerprints = {}, {}
    for d in args.data_seeds:
        base = prepare(inputs, d, args.items, args.users, args.overrides)
        references[d] = reference_scores(base)
        fingerprints[d] = inputs_fingerprint(inputs / f"data{d}" / "inputs")
        for model in args.models:
            for arm in args.arms:
                inits = args.inits if arm in HEADLINE else args.control_inits
                for seed in inits:
                    run_one(base, work, d, model, seed, arm)
    runs = load_runs(work, args.models, args.data_seeds, args.arms)
    claims = evaluate_claims(runs, args.models)
    headroom = evaluate_headroom(runs, args.models)
    table = arm_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(claims, out / "claims.png")
    result = {**inputs_record(args), "inputs": str(inputs), "inits": args.inits,
              "control_inits": args.control_inits, "models": args.models,
              "arms": table, "claims": claims,
              "headroom": headroom, "references": references,
              "inputs_fingerprint": fingerprints,
              "markdown": markdown(table, claims, headroom, references),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(out, "claims", result)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

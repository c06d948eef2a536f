"""``ptmrec diagnose RUN``: the two gaps the PTMRec paper names, before and after stage 2
(docs/diagnose.md).

* **Feature distribution discrepancy**: linear CKA (Kornblith et al. 2019) between a modality's
  item features (N x d_m) and the recommender's item representations (N x d), in the
  feature-space form ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``: O(N d^2), never N x N.
* **Task alignment**: the AUC of the cosine similarity of item features for co-interacted item
  pairs (two items with a common *training* user) against random item pairs, exact via ranks
  (Mann-Whitney U, ties count half).
* On synthetic data (a ``truth.json`` beside the interactions): a closed-form ridge probe of each
  hidden item attribute, trained on a seeded 80 % of the items, its accuracy on the other 20 %.

"frozen" rows: the run's ``data.features`` against the stage-1 item representations (a stage-2
run's teacher, or a stage-1 run itself); "adapted" rows (stage-2 runs): ``RUN/features/``
against the run's own item representations. Pairs and probe splits are the same for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from ptmrec_dist.clip.demo_eval import read_truth
from ptmrec_dist.config import load_config
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.eval.evaluate import load_representations
from ptmrec_dist.io import atomic_write_json
from ptmrec_dist.rec.features import load_item_features, modality_names, resolve_features
from ptmrec_dist.seeds import DIAG_PAIRS, DIAG_PROBE

OUTPUT = "diagnose.json"
PROBE_TEST, PROBE_VALID = 0.2, 0.25     # test share of items; validation share of the rest
PROBE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # lambda / mean eigenvalue of X^T X
CHUNK = 65536                           # rows per step of the Gram accumulation


# --------------------------------------------------------------------------- the measures
def linear_cka(x: np.ndarray, y: np.ndarray, chunk: int = CHUNK) -> float | None:
    """Linear CKA of two row-aligned matrices (N x d1, N x d2), columns centred, in float64,
    rows accumulated in chunks; None when either side is constant (CKA undefined)."""
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same rows: {len(x)} and {len(y)}")
    n = len(x)
    mx = sum(x[s:s + chunk].sum(0, dtype=np.float64) for s in range(0, n, chunk)) / n
    my = sum(y[s:s + chunk].sum(0, dtype=np.float64) for s in range(0, n, chunk)) / n
    xy = np.zeros((x.shape[1], y.shape[1]))
    xx, yy = np.zeros((x.shape[1],) * 2), np.zeros((y.shape[1],) * 2)
    for s in range(0, n, chunk):
        xc = x[s:s + chunk].astype(np.float64) - mx
        yc = y[s:s + chunk].astype(np.float64) - my
        xy += xc.T @ yc
        xx += xc.T @ xc
        yy += yc.T @ yc
    denom = np.linalg.norm(xx) * np.linalg.norm(yy)
    if not denom > 0:
        return None
    return float(min(1.0, np.sum(xy * xy) / denom))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half: the Mann-Whitney U from the
    average ranks of all scores, divided by ``len(pos) * len(neg)`` (exact, O(n log n))."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("AUC needs positives and negatives")
    ranks = rankdata(np.concatenate([pos, neg]), method="average")
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def cosine_pairs(features: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows ``i`` and ``j`` (0 where a row is all zeros)."""
    f = features.astype(np.float64)
    norm = np.linalg.norm(f, axis=1)
    f = f / np.where(norm > 0, norm, 1.0)[:, None]
    return np.einsum("nd,nd->n", f[i], f[j])


def cointeraction_pairs(inter, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``n`` pairs (i, j), i != j, of items with a common user in the *training* split: a
    training interaction (u, i) drawn uniformly among those of users with two or more training
    items, then j uniformly among u's other training items."""
    train = inter.csr("train")
    indptr, items = train.indptr, train.indices
    degree = np.diff(indptr)
    user_of = np.repeat(np.arange(len(degree)), degree)
    eligible = np.flatnonzero(degree[user_of] >= 2)
    if not len(eligible):
        raise InputError(inter.path, "no user has two or more training interactions: there are "
                                     "no co-interacted item pairs to measure task alignment on")
    k = eligible[rng.integers(len(eligible), size=n)]
    u = user_of[k]
    own = k - indptr[u]
    other = rng.integers(degree[u] - 1)          # among the other deg-1 items
    other = other + (other >= own)
    return items[k].astype(np.int64), items[indptr[u] + other].astype(np.int64)


def random_pairs(n_items: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``n`` uniform pairs of distinct items."""
    i = rng.integers(n_items, size=n)
    j = (i + 1 + rng.integers(n_items - 1, size=n)) % n_items
    return i, j


def probe_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``(train, test)`` split of ``n`` items: 80 % / 20 %."""
    order = rng.permutation(n)
    n_test = max(1, int(round(PROBE_TEST * n)))
    return order[n_test:], order[:n_test]


def _ridge_fit(x: np.ndarray, labels: np.ndarray, n_classes: int, alphas):
    """One-hot ridge on centred ``x``, one weight matrix per alpha (lambda = alpha x the mean
    eigenvalue of Xc^T Xc), through one eigendecomposition; returns ``(mean_x, mean_y, Ws)``."""
    mx = x.mean(0)
    xc = x - mx
    y = np.eye(n_classes)[labels]
    my = y.mean(0)
    s, v = np.linalg.eigh(xc.T @ xc)
    scale = max(float(s.sum()) / len(s), 1e-12)
    proj = v.T @ (xc.T @ (y - my))
    return mx, my, [v @ (proj / (np.maximum(s, 0) + a * scale)[:, None]) for a in alphas]


def _predict(x, fit, k: int = 0) -> np.ndarray:
    mx, my, ws = fit
    return ((x - mx) @ ws[k] + my).argmax(1)


def ridge_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                test: np.ndarray) -> float:
    """Accuracy on ``test`` of a ridge classifier fit on ``train``; lambda chosen from
    :data:`PROBE_ALPHAS` on the last :data:`PROBE_VALID` of ``train`` (ties: the larger)."""
    x = features.astype(np.float64)
    n_classes = int(labels.max()) + 1
    n_valid = max(1, int(round(PROBE_VALID * len(train))))
    fit_part, valid = train[:-n_valid], train[-n_valid:]
    alphas = sorted(PROBE_ALPHAS, reverse=True)
    fit = _ridge_fit(x[fit_part], labels[fit_part], n_classes, alphas)
    scores = [np.mean(_predict(x[valid], fit, k) == labels[valid]) for k in range(len(alphas))]
    best = alphas[int(np.argmax(scores))]                 # first maximum: the largest alpha
    final = _ridge_fit(x[train], labels[train], n_classes, [best])
    return float(np.mean(_predict(x[test], final) == labels[test]))


# --------------------------------------------------------------------------- the run
def _item_reps(run: Path, n_items: int) -> np.ndarray:
    items_r = load_representations(run)[1]
    if items_r.shape[0] != n_items:
        raise InputError(run / "item_repr.npy", f"{items_r.shape[0]} item rows, the "
                                                f"interactions have {n_items} items")
    return items_r


def _features(folder: Path, load, what: str):
    if not folder.is_dir():
        raise InputError(folder, f"missing: the {what} features folder")
    feats = load()
    if feats.empty:
        raise InputError(folder, f"no item features ({what}): expected image.npy / text.npy")
    return feats


def diagnose_run(run: str | Path, pairs: int = 20000, seed: int | None = None) -> dict:
    """Measure the gaps of a finished run; writes ``RUN/diagnose.json`` and returns it."""
    run = Path(run)
    if pairs < 1:
        raise ConfigError(f"--pairs must be at least 1, got {pairs}")
    if not run.is_dir() or not (run / "config.yaml").is_file():
        raise InputError(run, "not a run folder (no config.yaml): give a finished `ptmrec "
                              "stage1` or `ptmrec stage2` run folder")
    cfg = load_config(run / "config.yaml")
    metrics = {}
    if (run / "metrics.json").is_file():
        try:
            metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(run / "metrics.json", f"not readable JSON: {exc}") from None
    stage = 2 if "method" in metrics or (run / "adapter.safetensors").is_file() else 1
    seed = cfg.seed if seed is None else int(seed)
    inter = load_interactions(cfg.data.path, cfg.data, warn=lambda _m: None)
    n = inter.n_items
    if n < 2:
        raise InputError(inter.path, "fewer than two items: no item pairs to compare")
    wanted = modality_names(cfg.backbone.modalities)
    notes = []

    frozen_dir = Path(cfg.data.features) if cfg.data.features else inter.path.parent
    frozen = _features(frozen_dir, lambda: resolve_features(cfg.data, inter.path, n, False,
                                                            cfg.backbone.modalities), "frozen")
    sets = [("frozen", frozen)]
    teacher = cfg.stage2.teacher if stage == 2 else ""
    if stage == 2 and not teacher:
        notes.append("one-stage run (no stage2.teacher): frozen features are compared with this "
                     "run's own item representations")
    if teacher and not Path(teacher).is_dir():
        raise InputError(teacher, "missing: the run's stage2.teacher (stage-1 run) folder")
    reference = Path(teacher) if teacher else run        # the stage-1 model
    refs = {"frozen": _item_reps(reference, n)}
    sources = {"frozen": {"features": str(frozen_dir),
                          "item_repr": str(reference / "item_repr.npy")}}
    if stage == 2:
        adapted = _features(run / "features", lambda: load_item_features(run / "features", n,
                                                                         wanted), "adapted")
        sets.append(("adapted", adapted))
        refs["adapted"] = _item_reps(run, n)
        sources["adapted"] = {"features": str(run / "features"),
                              "item_repr": str(run / "item_repr.npy")}

    pos = cointeraction_pairs(inter, pairs, np.random.default_rng([seed, DIAG_PAIRS]))
    neg = random_pairs(n, pairs, np.random.default_rng([seed, DIAG_PAIRS, 1]))
    ids = [str(i) for i in inter.item_ids] if inter.item_ids is not None else \
        [str(i) for i in range(n)]
    truth = read_truth(inter.path.parent, ids)
    split = probe_split(n, np.random.default_rng([seed, DIAG_PROBE])) if truth else None

    rows = []
    for kind, feats in sets:
        for modality in ("image", "text"):
            f = feats.get(modality)
            if f is None:
                continue
            probes = None if truth is None else {
                a: ridge_probe(f, labels, *split) for a, labels in truth["attrs"].items()}
            rows.append({"features": kind, "modality": modality,
                         "cka_item_embedding": linear_cka(f, refs[kind]),
                         "auc_cointeraction": auc(cosine_pairs(f, *pos), cosine_pairs(f, *neg)),
                         "probe_accuracy": probes})
    result = {"run": str(run), "stage": stage, "pairs": int(pairs), "rows": rows,
              "seed": seed, "items": n, "sources": sources,
              "auc_item_representations": {k: auc(cosine_pairs(r, *pos), cosine_pairs(r, *neg))
                                           for k, r in refs.items()},
              "probe_chance": None if truth is None else {
                  a: 1.0 / len(truth["vocab"][a]) if truth["vocab"].get(a)
                  else 1.0 / (int(v.max()) + 1) for a, v in truth["attrs"].items()},
              "probe_items": None if split is None else {"train": len(split[0]),
                                                         "test": len(split[1])},
              "notes": notes}
    atomic_write_json(run / OUTPUT, result)
    return result


# --------------------------------------------------------------------------- text
def _num(x) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


def format_diagnosis(result: dict) -> str:
    """A readable table of :func:`diagnose_run`'s result (adapted - frozen per modality last)."""
    rows = result["rows"]
    attrs = sorted({a for r in rows for a in (r["probe_accuracy"] or {})})
    head = f"{'features':<9s}{'modality':<9s}{'CKA':>7s}{'AUC':>7s}" + \
        "".join(f"{a[:8]:>9s}" for a in attrs)
    lines = [f"diagnose {result['run']} (stage {result['stage']}, {result['pairs']} pairs per "
             f"side, seed {result.get('seed')})", "",
             "CKA: linear CKA(item features, item representations); AUC: cosine of features, "
             "co-interacted vs random pairs" + ("; probes: ridge accuracy on held-out items"
                                                if attrs else ""), "", head]

    def line(name, modality, cka, auc_, probes):
        return f"{name + ' ' + modality:<18s} {_num(cka)} {_num(auc_)}" + "".join(
            f"   {_num(probes.get(a) if probes else None)}" for a in attrs)
    by = {(r["features"], r["modality"]): r for r in rows}
    for r in rows:
        lines.append(line(r["features"], r["modality"], r["cka_item_embedding"],
                          r["auc_cointeraction"], r["probe_accuracy"]))
    for modality in ("image", "text"):
        a, b = by.get(("adapted", modality)), by.get(("frozen", modality))
        if a and b:
            def diff(key, sub=None):
                x, y = (a[key], b[key]) if sub is None else (
                    (a[key] or {}).get(sub), (b[key] or {}).get(sub))
                return None if x is None or y is None else x - y
            lines.append(line("change", modality, diff("cka_item_embedding"),
                              diff("auc_cointeraction"),
                              {k: diff("probe_accuracy", k) for k in attrs}))
    for kind, value in (result.get("auc_item_representations") or {}).items():
        lines.append(line(f"{kind} item repr"[:17], "", None, value, None))
    if result.get("probe_chance"):
        lines.append(line("chance", "", None, 0.5, result["probe_chance"]))
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)

"""The pages of ``ptmrec report`` for results of many runs: a sweep folder (``ptmrec tune
--out``: results.csv, summary.json, best.yaml) and the bench JSONs of ``bench/claims.py``
(claims.json) and ``bench/ml100k.py`` (ml100k.json). The page itself and the run folder's page
are in report.py."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ptmrec_dist import report_plots as plots
from ptmrec_dist.errors import InputError
from ptmrec_dist.report import Page, _json


def _value(text: str):
    if text is None or text == "":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def sweep_page(sweep: Path, out: Path) -> Page:
    path = sweep / "results.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [{k: _value(v) for k, v in r.items() if k is not None} for r in reader]
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(path, f"not a readable CSV ({e})") from None
    if "trial" not in columns or "status" not in columns:
        raise InputError(path, "expected the columns of `ptmrec tune`'s results.csv "
                               "(trial, status, searched values, valid/...)", line=1)
    summary = _json(sweep / "summary.json") if (sweep / "summary.json").is_file() else {}
    summary = summary if isinstance(summary, dict) else {}
    metric = summary.get("metric") or next((c for c in columns if c.startswith("valid/")), None)
    if metric is None or metric not in columns:
        raise InputError(path, "no valid/<metric> column (expected `ptmrec tune`'s "
                               "results.csv)", line=1)
    lo = columns.index("stopped_by") + 1 if "stopped_by" in columns else 2
    hi = columns.index("epochs_run") if "epochs_run" in columns else lo
    keys = columns[lo:hi] or list(((summary.get("best") or {}).get("params") or {}))
    page = Page(f"ptmrec report: sweep {sweep.name}", out)
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    ranked = sorted(scored, key=lambda r: (r["status"] != "error", r[metric]), reverse=True)
    best = ranked[0] if ranked else None
    page.p(f"{len(rows)} trials ({sum(r['status'] == 'completed' for r in rows)} completed, "
           f"{sum(r['status'] == 'stopped' for r in rows)} stopped early, "
           f"{sum(r['status'] == 'error' for r in rows)} failed); searched: "
           f"{', '.join(keys) or '-'}; chosen on {metric}")
    page.h2("Best trial", "best")
    test_metric = metric.replace("valid/", "test/", 1)
    if best is None:
        page.missing(f"no trial reported {metric}")
    else:
        page.table(["best trial", "value"], [["trial", best["trial"]],
                   *[[k, best.get(k)] for k in keys], [metric, best[metric]],
                   [test_metric, best.get(test_metric)], ["best epoch", best.get("best_epoch")]])
    if (sweep / "best.yaml").is_file():
        head = [ln for ln in (sweep / "best.yaml").read_text(encoding="utf-8").splitlines()
                if ln.startswith("#")]
        page.pre("\n".join(head + [f"(the whole config: {sweep / 'best.yaml'})"]))
    else:
        page.missing(f"no best.yaml in {sweep}")
    page.h2("The metric against each searched value", "params")
    if not keys:
        page.missing("no searched parameter found in results.csv's columns")
    for key in keys:
        points = [(r[key], r[metric], r["status"]) for r in scored if r.get(key) is not None]
        if not points:
            page.missing(f"{key}: no trial with both a value and {metric}")
            continue
        nums = [v for v, _, _ in points if isinstance(v, (int, float))]
        log_x = len(nums) == len(points) and min(nums) > 0 and max(nums) / min(nums) >= 20
        name = "sweep-" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
        page.figure(plots.sweep_param, name, f"{metric} of every trial against {key}", key,
                    points, metric, (best[key], best[metric]) if best and
                    best.get(key) is not None else None, log_x)
    page.h2("Every trial", "trials")
    shown = ["trial", "status", *keys, metric, *([test_metric] if test_metric in columns
                                                  else []),
             *[c for c in ("epochs_run", "best_epoch", "wall_s", "error") if c in columns]]
    page.table(shown, [[r.get(c) for c in shown] for r in rows])
    return page


# -- bench JSONs ------------------------------------------------------------------------------

def _pm(d: dict | None, digits: int = 4) -> str:
    if not isinstance(d, dict) or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.{digits}f} ± {d.get('std', 0.0):.{digits}f}"


def _signed(d) -> str:
    return "-" if not isinstance(d, dict) or d.get("mean") is None else f"{d['mean']:+.4f}"


def _ci(lo, hi) -> str:
    return "-" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def claims_table(page: Page, claims: list[dict]) -> None:
    """One row per claim: A vs B, runs, the paired difference, its interval, Holm's p, the
    verdict (bench/claims.py's rows, also in ml100k.json's ``claims``)."""
    table = []
    for c in claims:
        rel = c.get("relative_pct")
        table.append([c.get("claim"), c.get("statement"), c.get("model"),
                      f"{c.get('a', 'gain')} vs {c.get('b', 'gain')}", c.get("n_runs"),
                      _signed({"mean": c.get("mean_diff")}),
                      None if rel is None else f"{rel:+.1f} %",
                      _ci(*(c.get("ci95") or [None, None])), c.get("p_holm"),
                      "expected" if c.get("expected", True) else "expected not to hold",
                      c.get("verdict", "too few runs")])
    page.table(["claim", "statement", "model", "A vs B", "runs", "A - B", "relative",
                "95 % CI", "p (Holm)", "expectation", "verdict"], table)


def claims_page(path: Path, data: dict, out: Path) -> Page:
    """bench/claims.py: each claim's paired difference (A - B, test Recall@20) with its 95 %
    bootstrap interval, the Holm-corrected p-value and the verdict; the arms' means."""
    page = Page(f"ptmrec report: claims ({path.name})", out)
    page.p(f"synthetic benchmark: {data.get('items', '?')} items, {data.get('users', '?')} "
           f"users; data seeds {data.get('data_seeds', '?')}, init seeds {data.get('inits', '?')}"
           f" (controls {data.get('control_inits', '?')}); models {data.get('models', '?')}")
    claims = [c for c in data["claims"] if isinstance(c, dict)]
    shown = [c for c in claims if isinstance(c.get("mean_diff"), (int, float))]
    page.h2("Paired differences with 95 % intervals", "forest")
    if shown:
        rows = [{"label": f"({c.get('claim')}) {c.get('model')}: {c.get('a', 'gain')} - "
                          f"{c.get('b', 'gain')}", "mean": c["mean_diff"],
                 "lo": (c.get("ci95") or [None, None])[0],
                 "hi": (c.get("ci95") or [None, None])[1]} for c in shown]
        page.figure(plots.forest, "forest.png", "mean paired difference A - B in test "
                    "Recall@20, 95 % bootstrap interval (green: above 0, red: below 0)",
                    {"claims: A - B": rows}, "paired difference in test recall@20")
    else:
        page.missing("no claim has enough runs (two or more pairs) for an interval")
    page.h2("Claims", "claims")
    claims_table(page, claims)
    headroom = [h for h in data.get("headroom") or [] if isinstance(h, dict)]
    if headroom:       # claims.json of bench/claims.py with the headroom arms (oracle, caption)
        page.h2("Headroom: stage 1 on features that encode chosen true attributes", "headroom")
        page.table(["model", "pair", "measures", "runs", "A - B", "relative", "95 % CI",
                    "share of the gap"],
                   [[h.get("model"), f"{h.get('a')} - {h.get('b')}", h.get("measures"),
                     h.get("n_runs"), _signed({"mean": h.get("mean_diff")}),
                     None if h.get("relative_pct") is None else f"{h['relative_pct']:+.1f} %",
                     _ci(*(h.get("ci95") or [None, None])),
                     None if h.get("share_of_gap") is None else f"{100 * h['share_of_gap']:.0f} %"]
                    for h in headroom])
    arms = data.get("arms") if isinstance(data.get("arms"), dict) else {}
    page.h2("Arms: test Recall@20 over runs", "arms")
    if arms:
        page.table(["model/arm", "runs", "mean ± std", "SE of a run / value", "best epochs",
                    "epoch -1 kept"],
                   [[k, a.get("n"), _pm(a),
                     None if a.get("se_rel_pct") is None else f"{a['se_rel_pct']:.1f} %",
                     a.get("best_epochs"), a.get("epoch_minus1_kept")]
                    for k, a in arms.items()])
    else:
        page.missing("no 'arms' table in the JSON")
    return page


# bench/ml100k.py's paired blocks of a stage-2 row: (field, the arm subtracted)
ML100K_PAIRS = (("vs_frozen", "frozen"), ("vs_control", "frozen-backbone-kt"),
                ("vs_no_kt", "ptmrec-no-kt"))


def _diff_cells(block: dict | None) -> list[str]:
    """``mean [lo, hi]`` of a paired block's Recall@20 and NDCG@20."""
    return [f"{_signed(d)} {_ci(d.get('lo'), d.get('hi'))}"
            for d in ((block or {}).get(m) or {} for m in ("recall@20", "ndcg@20"))]


def ml100k_page(path: Path, data: dict, out: Path) -> Page:
    """bench/ml100k.py: stage 2 minus frozen (and minus the frozen-backbone-kt control, and
    ptmrec minus ptmrec-no-kt) per variant and method, 95 % t intervals over seeds; the stage-1
    and stage-2 tables."""
    summary = data["summary"]
    page = Page(f"ptmrec report: MovieLens-100k ({path.name})", out)
    page.p(f"seeds {data.get('seeds', '?')}; stage-2 runs with vbpr, the stage-1 vbpr run of "
           "the same variant, seed and modalities as teacher and frozen reference")
    stage2 = {k: r for k, r in (summary.get("stage2") or {}).items() if isinstance(r, dict)}
    panels = {}
    for metric, label in (("recall@20", "test Recall@20"), ("ndcg@20", "test NDCG@20")):
        rows = []
        for key, r in stage2.items():
            for field, ref in ML100K_PAIRS:
                d = (r.get(field) or {}).get(metric)
                if isinstance(d, dict) and d.get("mean") is not None:
                    rows.append({"label": f"{key} - {ref}", "mean": d["mean"],
                                 "lo": d.get("lo"), "hi": d.get("hi")})
        if rows:
            panels[f"{label}: paired difference"] = rows
    page.h2("Paired differences with 95 % intervals", "forest")
    if panels:
        page.figure(plots.forest, "forest.png", "stage 2 minus frozen (and minus the "
                    "frozen-backbone-kt control, ptmrec minus ptmrec-no-kt) per seed, mean and "
                    "95 % t interval over seeds "
                    "(grey: one seed, no interval)", panels, "paired difference (method - ref)")
    else:
        page.missing("no stage-2 row has a vs_frozen difference")
    paper = data.get("claims") if isinstance(data.get("claims"), dict) else {}
    claims = [c for c in paper.get("claims") or [] if isinstance(c, dict)]
    if claims:            # bench/ml100k.py's paper_claims: claims.py's statistics per variant
        page.h2("The paper's claims: per-user bootstrap, Holm-corrected", "claims")
        claims_table(page, claims)
    page.h2("Stage 2 (vbpr)", "stage2")
    rows = []
    for key, r in stage2.items():
        rows.append([key, _pm(r.get("recall@20")), _pm(r.get("ndcg@20")),
                     *_diff_cells(r.get("vs_frozen")),
                     r.get("trainable_backbone_pct"), len(r.get("seeds") or []),
                     r.get("best_epochs")])
        for field, ref in ML100K_PAIRS[1:]:        # paired against another stage-2 arm
            if isinstance(r.get(field), dict):
                n = (r[field].get("recall@20") or {}).get("n")
                rows.append([f"{key} minus {ref}", "", "", *_diff_cells(r[field]), "", n, ""])
    page.table(["variant / method-modalities", "R@20", "N@20", "R@20 - frozen (95 % CI)",
                "N@20 - frozen (95 % CI)", "backbone trained %", "seeds", "best epochs"], rows)
    page.h2("Stage 1", "stage1")
    stage1 = {k: r for k, r in (summary.get("stage1") or {}).items() if isinstance(r, dict)}
    if stage1:
        page.table(["variant / model-modalities", "R@10", "R@20", "N@10", "N@20", "seeds",
                    "best epochs", "wall s (mean)"],
                   [[k, *[_pm(r.get(m)) for m in ("recall@10", "recall@20", "ndcg@10",
                                                  "ndcg@20")],
                     len(r.get("seeds") or []), r.get("best_epochs"), r.get("wall_s")]
                    for k, r in stage1.items()])
    else:
        page.missing("no stage-1 rows in the JSON")
    return page


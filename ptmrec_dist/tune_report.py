"""The outputs of ``ptmrec tune``: ``results.csv`` (a row per trial), ``best.yaml`` (the best
trial's resolved config, by the valid metric only), ``sweep.png`` (the valid metric against every
searched dimension) and ``summary.json``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from ptmrec_dist.io import atomic_write_json, atomic_write_text


def _trial_id(result) -> str:
    metrics = result.metrics or {}
    if metrics.get("trial_id"):
        return str(metrics["trial_id"])
    m = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", Path(str(result.path)).name)
    return m.group(1) if m else Path(str(result.path)).name


def _metric_order(key: str):
    name, _, k = key.rpartition("/")[2].partition("@")
    return name, int(k) if k.isdigit() else 0


def _error_line(error) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def trial_rows(sweep, out: Path, grid) -> list[dict]:
    """One dict per trial (the columns of ``results.csv``), in trial order."""
    cfg = sweep.cfg
    max_epochs = cfg.stage2.epochs
    metric_name = cfg.tune.metric.split("/", 1)[1]
    rows = []
    for result in grid:
        trial = _trial_id(result)
        run = out / "trials" / trial
        m = dict(result.metrics or {})
        finished = json.loads((run / "metrics.json").read_text()) \
            if (run / "metrics.json").is_file() else None
        epochs = int(finished["epochs_run"]) if finished else int(m.get("epochs", 0))
        attempts = (run / "attempts.jsonl").read_text().count("\n") \
            if (run / "attempts.jsonl").is_file() else 0
        if result.error is not None:
            status, stopped_by = "error", ""
        elif finished is not None or epochs >= max_epochs:
            status = "completed"
            stopped_by = "patience" if finished and finished.get("stopped_early") else ""
        else:
            status, stopped_by = "stopped", cfg.tune.scheduler
        row = {"trial": trial, "status": status, "stopped_early": bool(stopped_by),
               "stopped_by": stopped_by}
        row.update({key: (result.config or {}).get(key) for key in sweep.keys})
        row.update({"epochs_run": epochs, "best_epoch": m.get("best_epoch")})
        for part, name in (("best_valid/", "valid/"), ("best_test/", "test/")):
            if f"{part}{metric_name}" in m:          # the chosen metric first, then the rest
                row[f"{name}{metric_name}"] = round(float(m[f"{part}{metric_name}"]), 6)
            for k in sorted((k for k in m if k.startswith(part)), key=_metric_order):
                row[k.replace(part, name)] = round(float(m[k]), 6)
        row.update({"wall_s": round(float(m.get("time_total_s", 0.0)), 2),
                    "retries": max(0, attempts - 1),
                    "error": _error_line(result.error) if result.error is not None else ""})
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _plot(path: Path, sweep, rows: list[dict], metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sweep.keys
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        spec = sweep.space[key]
        for status, marker, color in (("completed", "o", "tab:blue"),
                                      ("stopped", "x", "tab:orange"),
                                      ("error", "s", "tab:red")):
            pts = [(r[key], r.get(metric)) for r in rows
                   if r["status"] == status and r.get(metric) is not None]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            if any(isinstance(x, str) or isinstance(x, bool) for x in xs):
                xs = [str(x) for x in xs]
            ax.scatter(xs, [p[1] for p in pts], marker=marker, color=color, label=status)
        if isinstance(spec, dict) and "loguniform" in spec:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{sweep.path.name}: best {metric} per trial")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(sweep, out: Path, grid, wall_s: float, ray_start_s: float) -> dict:
    metric = sweep.cfg.tune.metric                        # valid/...
    rows = trial_rows(sweep, out, grid)
    _write_csv(out / "results.csv", rows)
    ranked = [r for r in rows if r.get(metric) is not None]
    # the valid metric alone chooses; errored trials only if nothing else reported
    ranked.sort(key=lambda r: (r["status"] != "error", r[metric]), reverse=True)
    best = ranked[0] if ranked else None
    if best is not None:
        config = (out / "trials" / best["trial"] / "config.yaml").read_text(encoding="utf-8")
        header = (f"# best trial of {sweep.path} ({best['trial']}): {metric} {best[metric]:.6f}"
                  f" at epoch {best['best_epoch']}\n# searched: "
                  + ", ".join(f"{k}={best[k]}" for k in sweep.keys)
                  + "\n# run it: ptmrec stage2 --config best.yaml --out RUN\n")
        atomic_write_text(out / "best.yaml", header + config)
    if rows:
        _plot(out / "sweep.png", sweep, rows, metric)
    test_metric = metric.replace("valid/", "test/", 1)
    summary = {
        "sweep": str(sweep.path), "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "wall_s": round(wall_s, 2), "ray_start_s": round(ray_start_s, 2),
        "trial_s_total": round(sum(r["wall_s"] for r in rows), 2),
        "metric": metric,
        "best": None if best is None else {
            "trial": best["trial"], "params": {k: best[k] for k in sweep.keys},
            metric: best[metric], test_metric: best.get(test_metric),
            "best_epoch": best["best_epoch"]},
    }
    atomic_write_json(out / "summary.json", summary)
    lines = [f"{'trial':<12} {'status':<10} " + " ".join(f"{k:>20}" for k in sweep.keys)
             + f" {metric:>20} {'epochs':>6}"]
    for r in rows:
        vals = " ".join(f"{_fmt(r[k]):>20}" for k in sweep.keys)
        lines.append(f"{r['trial']:<12} {r['status']:<10} {vals} {_fmt(r.get(metric)):>20} "
                     f"{r['epochs_run']:>6}")
    lines.append(f"{len(rows)} trials ({summary['stopped_early']} stopped early, "
                 f"{summary['errors']} failed) in {wall_s:.1f} s (Ray start-up "
                 f"{ray_start_s:.1f} s); results.csv, sweep.png in {out}")
    if best is not None:
        lines.append(f"best: {best['trial']} {metric} {best[metric]:.4f} "
                     f"({test_metric} {_fmt(best.get(test_metric))}) -> {out / 'best.yaml'}")
    summary["text"] = "\n".join(lines)
    return summary


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

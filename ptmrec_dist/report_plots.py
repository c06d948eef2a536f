"""The figures of ``ptmrec report`` (matplotlib, Agg backend): each function draws one PNG into
``path`` and returns it. Inputs are plain lists and dicts (report.py reads the files)."""

from __future__ import annotations

import math
from pathlib import Path

KEPT = "tab:red"
STAGE_COLOURS = ("tab:gray", "tab:blue")
DPI = 100


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_kept(ax, kept, label: bool = True) -> None:
    if kept is not None:
        ax.axvline(kept, color=KEPT, ls="--", lw=1.2,
                   label=f"kept epoch {kept}" if label else None)


def losses(path: Path, epochs: dict[str, list], kept) -> Path:
    """One small panel per loss term (``{term: [(epoch, value), ...]}``): their scales differ."""
    plt = _plt()
    terms = list(epochs)
    cols = min(4, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        xs, ys = zip(*epochs[term])
        ax.plot(xs, ys, "o-", color="tab:blue", ms=4)
        _mark_kept(ax, kept, label=term == terms[0])
        ax.set_title(term)
        _epoch_axis(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{term} (epoch mean)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    if kept is not None:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("training loss terms per epoch")
    return _save(fig, path)


def valid_curves(path: Path, curves: dict[str, dict[int, list]], kept, metric: str) -> Path:
    """``{"recall": {K: [(epoch, value), ...]}, "ndcg": {...}}``; the kept epoch is a dashed
    line and a star on every curve."""
    plt = _plt()
    names = [n for n in ("recall", "ndcg") if curves.get(n)]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for k in sorted(curves[name]):
            xs, ys = zip(*curves[name][k])
            line, = ax.plot(xs, ys, "o-", ms=3, label=f"{name}@{k}")
            at = [y for x, y in zip(xs, ys) if x == kept]
            if at:
                ax.plot([kept], at, "*", ms=13, color=line.get_color(), mec="black")
        _mark_kept(ax, kept)
        _epoch_axis(ax)
        label = "Recall" if name == "recall" else "NDCG"
        ax.set_title(f"valid {label}@K per epoch")
        ax.set_xlabel("epoch (-1: before training)" if min(
            x for pts in curves[name].values() for x, _ in pts) < 0 else "epoch")
        ax.set_ylabel(f"valid {label}@K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"validation metrics (the kept epoch is chosen on valid {metric})")
    return _save(fig, path)


def stages(path: Path, series: dict[str, dict[str, float]], ks: list[int]) -> Path:
    """Grouped bars: test Recall@K and NDCG@K of each series (``{label: test metrics}``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    width = 0.8 / max(1, len(series))
    for ax, name, label in zip(axes[0], ("recall", "ndcg"), ("Recall", "NDCG")):
        for i, (who, test) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(ks))]
            ys = [test.get(f"{name}@{k}", float("nan")) for k in ks]
            bars = ax.bar(xs, ys, width, label=who, color=STAGE_COLOURS[i % 2])
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(len(ks)), [f"@{k}" for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"test {label}@K")
        ax.set_title(f"test {label}@K")
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _save(fig, path)


def diagnose(path: Path, rows: list[dict]) -> Path:
    """Bars of the item-embedding CKA and the co-interaction AUC per modality, frozen against
    adapted features."""
    plt = _plt()
    modalities = sorted({r["modality"] for r in rows})
    kinds = [k for k in ("frozen", "adapted") if any(r["features"] == k for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    width = 0.8 / max(1, len(kinds))
    for ax, key, label in zip(axes[0], ("cka_item_embedding", "auc_cointeraction"),
                              ("CKA(features, item embeddings)", "co-interaction AUC")):
        for i, kind in enumerate(kinds):
            xs, ys = [], []
            for j, m in enumerate(modalities):
                hit = [r[key] for r in rows if r["features"] == kind and r["modality"] == m]
                if hit and hit[0] is not None:
                    xs.append(j + (i - (len(kinds) - 1) / 2) * width)
                    ys.append(hit[0])
            bars = ax.bar(xs, ys, width, label=f"{kind} features",
                          color=STAGE_COLOURS[i % 2])
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        if key == "auc_cointeraction":
            ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance (0.5)")
        ax.set_xticks(range(len(modalities)), modalities)
        ax.set_xlabel("modality")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _save(fig, path)


def sweep_param(path: Path, key: str, points: list[tuple], metric: str, best,
                log_x: bool) -> Path:
    """The metric of every trial against one searched value; ``points``: (value, metric,
    status); ``best``: the best trial's (value, metric) or None."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    categorical = any(isinstance(v, str) for v, _, _ in points)
    order = sorted({str(v) for v, _, _ in points}) if categorical else None

    def x(v):
        return order.index(str(v)) if categorical else v
    for status, marker, colour in (("completed", "o", "tab:blue"), ("stopped", "x", "tab:orange"),
                                   ("error", "s", "tab:red")):
        pts = [(x(v), m) for v, m, s in points if s == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=colour, label=status)
    others = [(x(v), m) for v, m, s in points if s not in ("completed", "stopped", "error")]
    if others:
        ax.scatter(*zip(*others), marker="^", color="tab:gray", label="other")
    if best is not None:
        ax.scatter([x(best[0])], [best[1]], marker="*", s=220, facecolor="none",
                   edgecolor=KEPT, lw=1.5, label="best trial")
    if categorical:
        ax.set_xticks(range(len(order)), order)
    elif log_x:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.18)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def forest(path: Path, panels: dict[str, list[dict]], xlabel: str) -> Path:
    """A forest plot per panel: ``[{"label", "mean", "lo", "hi"}]`` (lo/hi None: no interval)."""
    plt = _plt()
    height = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.45 * height + 1.6),
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items()):
        for i, r in enumerate(rows):
            y = len(rows) - 1 - i
            if r["lo"] is not None and r["hi"] is not None:
                ax.plot([r["lo"], r["hi"]], [y, y], color="tab:blue", lw=2)
                colour = "tab:green" if r["lo"] > 0 else KEPT if r["hi"] < 0 else "tab:blue"
            else:
                colour = "tab:gray"
            ax.plot([r["mean"]], [y], "o", color=colour, ms=6)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_yticks(range(len(rows)), [r["label"] for r in reversed(rows)], fontsize=9)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)

"""Write ``bench/README.md`` from ``bench/results/*.json``: one table of every figure with its
goal (where an issue set one), the measured value, the machine (cores, torch threads, versions),
the commit and the date of the run that measured it; plots found beside the results are linked.

    .venv/bin/python bench/_readme.py [--results bench/results] [--out bench/README.md]

`make bench` calls it last. Each benchmark's figures are read by a function below; a result
without one is summarised by its numeric leaves, so a new benchmark still appears.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent
Row = tuple[str, str, str]          # figure, goal, measured


def _g(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _eval_reference(r: dict) -> Iterable[Row]:
    for run in r.get("runs", []):
        shape = f"{run['users']:,} users x {run['items']:,} items"
        runs = (f"; median of {len(run['ours_runs_s'])} runs, ours {min(run['ours_runs_s'])}-"
                f"{max(run['ours_runs_s'])} s" if "ours_runs_s" in run else "")
        yield (f"evaluator vs MMRec protocol, {shape}: speed-up", ">= 3x",
               f"{run['speedup']}x ({run['ours_s']} s vs {run['mmrec_s']} s{runs})")
        yield (f"evaluator vs MMRec protocol, {shape}: largest metric difference", "<= 1e-6",
               f"{run['max_abs_metric_diff']:.1e}")


def _gpu(r: dict) -> Iterable[Row]:
    """bench/gpu.py: the GPU machine's figures (the device named in each row)."""
    for row in r.get("rows", []):
        part, res = row["part"], row.get("result")
        where = (row.get("machine") or {}).get("name") or r.get("device", "")
        if row.get("status") != "ok" or res is None:
            yield (f"gpu {part} ({where})", "", row.get("status", "?"))
        elif part == "matmul":
            yield (f"gpu {part}: {res['dtype']} {res['n']}^2 ({where})", "",
                   f"{res['tflops']:.1f} TFLOP/s")
        elif part == "tower":
            share = f", {res['share_of_matmul']:.0%} of matmul" if "share_of_matmul" in res else ""
            yield (f"gpu image tower, {r.get('preset')} {res['dtype']} ({where})", "",
                   f"{res['images_per_s']:.0f} img/s ({res['tflops']:.1f} TFLOP/s{share})")
        elif part == "extract":
            share = (f", {res['share_of_tower']:.0%} of the tower alone"
                     if "share_of_tower" in res else "")
            yield (f"gpu `ptmrec extract` end to end, {res['items']} items ({where})", "",
                   f"{res['items_per_s']} items/s{share}")
        elif part == "stage2":
            for x in res:
                yield (f"gpu stage-2 step, {x['method']}, checkpointing "
                       f"{'on' if x['checkpointing'] else 'off'} ({where})",
                       "prompt: <= 0.5x memory" if x["method"] == "prompt" else "",
                       f"{x['images_per_s']:.1f} img/s, peak {x['peak_mb']:.0f} MB "
                       f"({x['peak_vs_full']:.2f}x / {x['time_vs_full']:.2f}x of full)")
        elif part == "nccl":
            yield (f"gpu {res['backend']} all-reduce, 1 rank ({where})", "",
                   f"{res['seconds'] * 1e3:.2f} ms for 256 MB")


def _eval_scale(r: dict) -> Iterable[Row]:
    for run in r.get("runs", []):
        yield (f"evaluation, {run['users']:,} users x {run['items']:,} items: time, memory", "",
               f"{run['seconds']} s ({run['users_per_s']} users/s), "
               f"+{run['eval_peak_increase_mb']} MB peak")


def _graph_scale(r: dict) -> Iterable[Row]:
    for run in r.get("runs", []):
        feats = "clustered" if run["clusters"] else "Gaussian"
        yield (f"kNN item graph, {run['items']:,} items x {run['dim']}-d, {feats}, "
               f"{run['knn_method']}", "",
               f"{run['knn_seconds']} s, peak RSS {run['knn_peak_rss_mb']} MB, "
               f"recall@10 {run['knn_recall_at_10']}")
        yield (f"degree-sensitive pruning, {run['edges']:,} edges", "",
               f"{run['prune_seconds']} s")


def _extract(r: dict) -> Iterable[Row]:
    gemm = r.get("gemm_fp32_gflops")
    yield ("fp32 GEMM rate (the machine's ceiling)", "", f"{gemm} GFLOP/s")
    for key, name in (("demo_profile", "demo backbone"), ("vit_b16_profile", "ViT-B/16")):
        for row in r.get(key, []):
            yield (f"extract profile, {name}, {row['workers']} loader worker(s), "
                   f"{row['torch_threads']} torch thread(s)", "",
                   f"{row['items_per_s']} items/s; waiting for data "
                   f"{row['loader_wait_share']:.0%}, towers {row['encode_share']:.0%}")
    for key, name in (("demo_shape", "demo backbone"), ("vit_b16", "ViT-B/16")):
        if key in r:
            d = r[key]
            yield (f"`ptmrec extract` vs naive per-item loop, {name}", ">= 3x (never < 1x)",
                   f"{d['speedup']}x ({d['extract_items_per_s']} vs {d['naive_items_per_s']} "
                   "items/s)")
    e2e = _g(r, "vit_b16", "extract_fraction_of_gemm_lower_bound")
    if e2e is not None:
        yield ("`ptmrec extract` end to end, ViT-B/16: share of the GEMM rate (image FLOPs only)",
               ">= 0.70", f"{e2e} ({r['vit_b16']['extract_image_gflops']} GFLOP/s)")
    tower = r.get("vit_b16_image_tower")
    if tower:
        yield ("ViT-B/16 image tower alone: share of the GEMM rate", "",
               f"{tower['fraction_of_gemm']} ({tower['achieved_gflops']} GFLOP/s)")


def _stage2_cost(r: dict) -> Iterable[Row]:
    yield ("stage-2 cost preset", "", f"{r.get('preset')} (batch {r.get('batch')}, "
           f"{r.get('threads')} threads)")
    # the goals are set for OpenAI's ViT-B/16 shape; the tiny preset (`make bench`) is a model so
    # small that the process's fixed memory dominates: its ratios say nothing about the goals
    at_size = r.get("preset") == "vit-b16"
    for g in r.get("goals", []):
        for key in ("peak_ratio", "step_time_ratio", "trainable_pct"):
            if isinstance(g.get(key), dict):
                v = g[key]
                if at_size:
                    yield (f"{g['row']} vs {g['vs']}: {key}", v["goal"],
                           f"{v['value']} ({v['result']})")
                else:
                    yield (f"{g['row']} vs {g['vs']}: {key} (tiny preset; the goal {v['goal']} "
                           "is for vit-b16)", "", str(v["value"]))


def _data(r: dict) -> Iterable[Row]:
    syn = r.get("synthetic", {})
    if syn:
        yield (f"make-data synthetic, {syn['items']:,} items", "",
               f"{syn['seconds']} s ({round(syn['items'] / syn['seconds'])} items/s)")
    for w in (1, 2):
        d = r.get(f"shard_workers{w}")
        if d:
            yield (f"shard, {w} worker(s)", "", f"{d['items_per_s']} items/s")
    p = r.get("parse")
    if p:
        yield (f"parse interactions ({p['rows']:,} rows)", "", f"{p['rows_per_s']:,} rows/s")


def _stage1(r: dict) -> Iterable[Row]:
    for where in ("baby", "synthetic"):
        for model, d in (r.get(where) or {}).items():
            yield (f"stage-1 epoch, {model} on {where}", "",
                   f"{d.get('epoch_s_mean')} s/epoch, eval {d.get('eval_s_mean')} s, "
                   f"peak {d.get('peak_rss_mb')} MB")
    q = r.get("quality_baby")
    if isinstance(q, dict):
        for k, v in q.items():
            if isinstance(v, dict) and "test_recall@20" in v:
                yield (f"Amazon Baby {k}: test Recall@20", "", str(v["test_recall@20"]))


def _scaling(r: dict) -> Iterable[Row]:
    for step, fit in (r.get("exponents") or {}).items():
        yield (f"growth exponent of {step} (time vs items)", fit.get("goal", ""),
               f"{fit['exponent']:.2f} over {fit['sizes']}")
    for row in r.get("runs", []):
        note = "".join(f", {k} {row[k]}" for k in ("sampler", "knn_method", "knn_recall_at_10")
                       if k in row)
        yield (f"{row['step']} at {row['items']:,} items", "",
               f"{row['seconds']:.3g} s, peak RSS {row['peak_rss_mb']} MB{note}")


def _sparse_embeddings(r: dict) -> Iterable[Row]:
    for arm, d in r.get("table", {}).items():
        yield (f"{r['model']} on {r['data']}, {arm} Adam: test Recall@20, epoch time", "",
               f"{sum(d['recall@20']) / len(d['recall@20']):.4f} (n={len(d['recall@20'])}), "
               f"{d['epoch_s_mean']} s/epoch")
    for k, d in r.get("sparse_minus_dense", {}).items():
        yield (f"sparse minus dense Adam, test {k}", "", _ci(d))


def _ms(d: dict) -> str:
    """``mean ± std (n)`` of a ``{"mean", "std", "runs"}`` summary."""
    n = len(d.get("runs", [])) or d.get("n", "?")
    return f"{d['mean']:.4f} ± {d.get('std', 0):.4f} (n={n})"


def _ci(d: dict) -> str:
    lo, hi = d.get("lo"), d.get("hi")
    interval = f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
    return f"{d['mean']:+.4f}{interval} (n={d.get('n', '?')})"


def _ablation(r: dict) -> Iterable[Row]:
    size = f"{r['items']} items x {r['users']} users, seeds {r['seeds']}"
    for arm, d in r.get("table", {}).items():
        yield (f"{arm}: test Recall@20 ({size})", "", _ms(d["recall@20"]))


def _claims(r: dict) -> Iterable[Row]:
    for arm, d in r.get("arms", {}).items():
        yield (f"{arm}: test Recall@20, epoch -1 kept in {d['epoch_minus1_kept']}", "",
               f"{d['mean']:.4f} ± {d['std']:.4f} (n={d['n']})")
        if "se_rel_pct" in d:
            yield (f"{arm}: standard error of one run's test Recall@20 / its value",
                   "<= 3 %", f"{d['se_rel_pct']:.1f} % "
                   f"({', '.join(map(str, d['test_users']))} test users)")
    refs = list((r.get("references") or {}).values())
    for name in ("true-utility", "pop"):
        if refs:
            v = [x[name]["recall@20"] for x in refs]
            yield (f"{name} ranking (no training): test Recall@20", "",
                   f"{sum(v) / len(v):.4f} (n={len(v)} data seeds)")
    for h in r.get("headroom", []):
        if "mean_diff" in h:
            lo, hi = h["ci95"]
            share = f", {100 * h['share_of_gap']:.0f} % of the gap" if "share_of_gap" in h else ""
            yield (f"headroom ({h['model']}): {h['a']} - {h['b']}, test Recall@20", "",
                   f"{h['mean_diff']:+.4f} ({h['relative_pct']:+.1f} %) [{lo:+.4f}, {hi:+.4f}]"
                   f"{share}")
    yield from _claim_rows(r.get("claims", []))


def _claim_rows(claims: list[dict]) -> Iterable[Row]:
    for c in claims:
        if "mean_diff" in c:
            lo, hi = c["ci95"]
            yield (f"claim {c['claim']} ({c['model']}): {c['statement']}", "",
                   f"{c['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}], p(Holm) {c['p_holm']:.3g}: "
                   f"{c['verdict']}")


def _probe_adapt(r: dict) -> Iterable[Row]:
    for key, methods in r.get("summary", {}).items():
        for method, d in methods.items():
            yield (f"probe {key}, {method}: test accuracy (chance "
                   f"{d['runs'][0]['chance']:.3f})", "",
                   f"{d['test_mean']:.3f} ± {d['test_std']:.3f} (n={len(d['runs'])})")


def _redesign(r: dict) -> Iterable[Row]:
    for value, row in r.get("rows", {}).items():
        v = row["valid"]
        for name, what in (("headroom", "oracle-unit - frozen"), ("gain", "ptmrec - frozen")):
            if name in v:
                d = v[name]
                ci = "" if d.get("lo") is None else f" [{d['lo']:+.1f}, {d['hi']:+.1f}]"
                yield (f"{r['knob']}={value}, {r['model']}: valid Recall@20 {what}", "",
                       f"{d['mean']:+.1f} %{ci} (n={d['n']})")
        for key, methods in row.get("probe", {}).items():
            yield (f"{r['knob']}={value}: probe {key} valid accuracy", "",
                   ", ".join(f"{m} {a:.2f}" for m, a in methods.items()))


def _cold_start(r: dict) -> Iterable[Row]:
    for arm, d in r.get("rows", {}).items():
        yield (f"{arm}: cold-item Recall@20", "", _ms(d["cold/recall@20"]))
        for other in [k for k in d if k.startswith("minus ")]:
            yield (f"{arm} {other}: cold-item Recall@20", "", _ci(d[other]["cold/recall@20"]))


def _ml100k(r: dict) -> Iterable[Row]:
    for stage, rows in (r.get("summary") or {}).items():
        for name, d in rows.items():
            if isinstance(d, dict) and "recall@20" in d:
                yield (f"{stage} {name}: test Recall@20", "", _ms(d["recall@20"]))
    yield from _claim_rows((r.get("claims") or {}).get("claims", []))


def _tune_demo(r: dict) -> Iterable[Row]:
    yield ("sweep: trials (completed / stopped early / errors), wall time", "",
           f"{r['trials']} ({r['completed']} / {r['stopped_early']} / {r['errors']}), "
           f"{r['wall_s']} s (Ray start-up {r.get('ray_start_s')} s)")
    b = r.get("best") or {}
    if b:
        yield ("best trial, chosen on valid Recall@20", "",
               f"{b['params']}: valid {b['valid/recall@20']}, test {b['test/recall@20']}")


def _leaves(d, prefix="") -> Iterable[tuple[str, float]]:
    if isinstance(d, dict):
        for k, v in d.items():
            if not str(k).startswith("_"):
                yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield prefix, d


def _generic(r: dict, limit: int = 8) -> Iterable[Row]:
    leaves = list(_leaves(r))
    for key, value in leaves[:limit]:
        yield (key, "", f"{value:g}")
    if len(leaves) > limit:
        yield (f"... {len(leaves) - limit} more numbers in the JSON", "", "")


READERS: dict[str, Callable[[dict], Iterable[Row]]] = {
    "eval_reference": _eval_reference, "eval_scale": _eval_scale, "gpu": _gpu,
    "graph_scale": _graph_scale, "extract": _extract, "stage2_cost": _stage2_cost,
    "data": _data, "stage1": _stage1, "scaling": _scaling,
    "sparse_embeddings": _sparse_embeddings, "ablation": _ablation,
    "claims": _claims, "probe_adapt": _probe_adapt, "redesign": _redesign,
    "cold_start": _cold_start,
    "ml100k": _ml100k, "tune_demo": _tune_demo}


def _machine(p: dict) -> str:
    v = p.get("versions") or {}
    isa = f" ({p['cpu_capability']})" if p.get("cpu_capability") else ""
    return (f"{p.get('cpus', '?')} cores{isa}, {p.get('torch_threads', '?')} threads, "
            f"torch {v.get('torch', '?')}")


def render(results: Path, readme: Path) -> str:
    lines = ["# Benchmark figures",
             "",
             "Generated by `bench/_readme.py` from `bench/results/*.json` (`make bench` runs "
             "every benchmark at its `make bench` size, then this); do not edit by hand. "
             "Benchmarks report figures, tests assert behaviour: nothing here is a pass/fail "
             "gate. Sizes, commands and what each figure means are in each script's docstring "
             "and in the docs it names. At `make bench` size the quality benchmarks (ablation, "
             "claims, probe_adapt, redesign, cold_start, ml100k, tune_demo) run one or two "
             "seeds on a few hundred users: their metrics show the benchmark runs, they are not "
             "results (the docs quote the full runs, `make bench-full`).",
             ""]
    files = sorted(results.glob("*.json"))
    if not files:
        return "\n".join(lines + ["No results yet: run `make bench`.", ""])
    lines += ["| benchmark | figure | goal | measured | machine | commit | date |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in files:
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            lines.append(f"| {path.stem} | unreadable: {exc} | | | | | |")
            continue
        prov = r.get("_provenance") or {}
        commit = (prov.get("commit") or "?")[:7] + ("+" if prov.get("dirty") else "")
        date = (prov.get("date") or "?")[:10]
        # NAME-LABEL.json (e.g. claims-v1: the same bench on an earlier design) reads as NAME
        reader = READERS.get(path.stem.split("-")[0], _generic)
        try:
            rows = list(reader(r))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            rows = [(f"(could not read: {type(exc).__name__} {exc})", "", "")]
        for fig, goal, value in rows:
            lines.append(f"| {path.stem} | {fig} | {goal} | {value} | {_machine(prov)} | "
                         f"{commit} | {date} |")
    plots = sorted(results.glob("*.png"))
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"- [{p.name}]({os.path.relpath(p, readme.parent)})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--out", default=None,
                    help="default: bench/README.md for bench/results, else RESULTS/README.md")
    args = ap.parse_args()
    if args.out is None:
        default = Path(args.results).resolve() == (HERE / "results").resolve()
        args.out = str(HERE / "README.md" if default else Path(args.results) / "README.md")
    Path(args.out).write_text(render(Path(args.results), Path(args.out)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ptmrec report TARGET``: one self-contained ``report.html`` (no network: inline CSS, every
figure a base64 ``data:image/png`` URI) with the PNGs beside it, for

* a run folder (stage 1 or 2): loss terms and valid Recall/NDCG per epoch (the kept epoch
  marked), stage-1 (the teacher) against stage-2 test metrics, parameters and time, and
  ``diagnose.json`` when ``ptmrec diagnose`` wrote one;
* a sweep folder (``ptmrec tune --out``): the valid metric against each searched value, the
  best trial, every trial;
* a bench JSON (``bench/claims.py``'s ``claims.json``, ``bench/ml100k.py``'s ``ml100k.json``):
  a forest plot of the paired differences with their 95 % intervals, and the tables.

A missing piece (no teacher, no diagnose.json, no metrics.json yet) is said in the page.
Anything else is an :class:`InputError` (exit 2) naming the path and what was expected.
The run page is here; the sweep and bench pages are in report_results.py, the figures in
report_plots.py. docs/report.md describes the page.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ptmrec_dist import report_plots as plots
from ptmrec_dist.errors import InputError

EXPECTED = ("a run folder (config.yaml with log.jsonl or metrics.json), a sweep folder "
            "(results.csv from `ptmrec tune --out`) or a bench JSON (claims.json from "
            "bench/claims.py, ml100k.json from bench/ml100k.py)")
NOT_LOSS = {"epoch", "elapsed_s", "items", "items_per_s", "backbone_shift", "best"}
METRIC_NAMES = ("recall", "ndcg", "precision", "map", "hit")
CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}
td:first-child,th:first-child,td.t{text-align:left}
figure{display:inline-block;vertical-align:top;margin:.8em .8em .8em 0}
img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}
.missing{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


class Page:
    """The HTML body as a list of parts; figures are drawn into the report folder."""

    def __init__(self, title: str, out: Path):
        self.title, self.out, self.parts, self.figures = title, out, [], []

    def h2(self, text: str, anchor: str) -> None:
        self.parts.append(f'<h2 id="{esc(anchor)}">{esc(text)}</h2>')

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{esc(text)}</p>")

    def missing(self, text: str) -> None:
        self.parts.append(f'<p class="missing">{esc(text)}</p>')

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{esc(text)}</pre>")

    def table(self, header: list, rows: list[list]) -> None:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(
            f"<td>{esc(fmt(c))}</td>" if c is None or isinstance(c, (int, float))
            else f'<td class="t">{esc(fmt(c))}</td>' for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, draw, name: str, caption: str, *args) -> None:
        path = draw(self.out / name, *args)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.figures.append(path)
        self.parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                          f"<figcaption>{esc(caption)} ({esc(name)})</figcaption></figure>")

    def write(self, source: Path) -> Path:
        doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
               f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
               f"<h1>{esc(self.title)}</h1><p>source: <code>{esc(source)}</code></p>"
               + "\n".join(self.parts) + "</body></html>\n")
        path = self.out / "report.html"
        tmp = path.with_name(".report.html.tmp")
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(path)
        return path


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg})", line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot be read ({e})") from None


def _log(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not a JSON record ({e.msg})", line=n) from None
        if not isinstance(rec, dict):
            raise InputError(path, "expected one JSON object per line", line=n)
        records.append(rec)
    return records


def _config(run: Path) -> dict:
    import yaml
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(path, f"not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def kind_of(target: Path) -> tuple[str, object]:
    """``("run"|"sweep"|"claims"|"ml100k", loaded data or None)``, or an InputError."""
    if not target.exists():
        raise InputError(target, f"no such file or folder; expected {EXPECTED}")
    if target.is_dir():
        if (target / "results.csv").is_file():
            return "sweep", None
        if (target / "metrics.json").is_file() or (target / "log.jsonl").is_file():
            return "run", None
        raise InputError(target, f"a folder with neither metrics.json/log.jsonl nor "
                                 f"results.csv; expected {EXPECTED}")
    if target.suffix != ".json":
        raise InputError(target, f"not a folder or a .json file; expected {EXPECTED}")
    data = _json(target)
    if isinstance(data, dict) and isinstance(data.get("claims"), list):
        return "claims", data
    summary = data.get("summary") if isinstance(data, dict) else None
    if isinstance(summary, dict) and isinstance(summary.get("stage2"), dict):
        return "ml100k", data
    raise InputError(target, "a JSON that is neither claims.json (bench/claims.py: a 'claims' "
                             "list) nor ml100k.json (bench/ml100k.py: a 'summary' with "
                             "'stage1'/'stage2')")


def write_report(target, out=None) -> str:
    """Write ``OUT/report.html`` and its PNGs (default OUT: ``TARGET/report`` for a folder,
    ``<stem>-report/`` beside a JSON); returns a one-line summary."""
    target = Path(target)
    kind, data = kind_of(target)
    if out is None:
        out = target / "report" if target.is_dir() else \
            target.with_name(f"{target.stem}-report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder (report.html and the PNGs go there)")
    out.mkdir(parents=True, exist_ok=True)
    if kind == "run":
        page = run_page(target, out)
    else:
        from ptmrec_dist import report_results as results
        page = results.sweep_page(target, out) if kind == "sweep" else \
            getattr(results, f"{kind}_page")(target, data, out)
    path = page.write(target)
    what = page.title.removeprefix("ptmrec report: ")
    n = len(page.figures)
    return f"wrote {path} ({what}: {n} figure{'s' * (n != 1)}, the PNGs beside it)"


# -- a run folder ----------------------------------------------------------------------------

def loss_terms(records: list[dict]) -> dict[str, list]:
    terms: dict[str, list] = {}
    for rec in records:
        if "loss" not in rec or not isinstance(rec.get("epoch"), int):
            continue
        for key, v in rec.items():
            if key in NOT_LOSS or key.endswith("_s") or isinstance(v, bool) \
                    or not isinstance(v, (int, float)):
                continue
            terms.setdefault(key, []).append((rec["epoch"], v))
    return dict(sorted(terms.items(), key=lambda kv: kv[0] != "loss"))


def valid_curves(records: list[dict]) -> dict[str, dict[int, list]]:
    curves: dict[str, dict[int, list]] = {"recall": {}, "ndcg": {}}
    for rec in records:
        valid = rec.get("valid")
        if not isinstance(valid, dict) or not isinstance(rec.get("epoch"), int):
            continue
        for key, v in valid.items():
            name, _, k = key.partition("@")
            if name in curves and k.isdigit() and isinstance(v, (int, float)):
                curves[name].setdefault(int(k), []).append((rec["epoch"], v))
    return curves


def ks_of(test: dict) -> list[int]:
    return sorted({int(k.partition("@")[2]) for k in test
                   if k.partition("@")[2].isdigit() and k.partition("@")[0] in METRIC_NAMES})


def _teacher(run: Path, cfg: dict, metrics: dict) -> tuple[str | None, Path | None]:
    """(the configured teacher, its folder when it has a metrics.json)."""
    name = (cfg.get("stage2") or {}).get("teacher") or metrics.get("teacher")
    if not name:
        return None, None
    for path in (Path(name), run.parent / name, run / name):
        if (path / "metrics.json").is_file():
            return str(name), path
    return str(name), None


def run_page(run: Path, out: Path) -> Page:
    metrics = _json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    records = _log(run / "log.jsonl") if (run / "log.jsonl").is_file() else []
    cfg = _config(run)
    stage = 2 if ("method" in metrics or "teacher" in metrics or "params" in metrics
                  or any("extract_s" in r for r in records)) else 1
    kept = metrics.get("best_epoch")
    if kept is None:
        kept = next((r["epoch"] for r in reversed(records) if r.get("best")), None)
    page = Page(f"ptmrec report: stage-{stage} run {run.name}", out)
    model = metrics.get("model") or (cfg.get("recommender") or {}).get("name")
    metric = metrics.get("metric") or (cfg.get("eval") or {}).get("metric", "recall@20")
    page.table(["run", "value"], [
        ["folder", str(run)], ["stage", stage], ["model", model],
        *([["method", metrics.get("method")], ["kt_weight", metrics.get("kt_weight")]]
          if stage == 2 else []),
        ["selection metric (valid)", metric], ["kept (best) epoch", kept],
        ["epochs run", metrics.get("epochs_run", len(records))],
        ["stopped early", metrics.get("stopped_early")],
        ["commit", (metrics.get("provenance") or {}).get("commit")]])
    if not metrics:
        page.missing(f"no metrics.json in {run}: the run has not finished (or failed); "
                     "the curves below come from log.jsonl alone")
    if not records:
        page.missing(f"no log.jsonl records in {run}: no per-epoch curves")

    page.h2("Training loss per epoch", "losses")
    terms = loss_terms(records)
    if terms:
        page.p("terms logged: " + ", ".join(terms) + " (loss = the weighted total)")
        page.figure(plots.losses, "losses.png", "loss terms per epoch, the kept epoch dashed",
                    terms, kept)
    else:
        page.missing("no epoch record carries a loss (nothing was trained, e.g. a popularity "
                     "baseline)")

    page.h2("Validation Recall / NDCG per epoch", "valid")
    curves = valid_curves(records)
    if any(curves.values()):
        page.figure(plots.valid_curves, "valid.png",
                    f"valid Recall@K and NDCG@K; star and dashed line: the kept epoch {kept}",
                    curves, kept, metric)
    else:
        page.missing("no epoch record carries valid metrics")

    teacher_name, teacher = _teacher(run, cfg, metrics) if stage == 2 else (None, None)
    teacher_m = _json(teacher / "metrics.json") if teacher else {}
    _stage_section(page, stage, metrics, teacher_name, teacher, teacher_m)
    _cost_section(page, stage, metrics, teacher_m)
    _diagnose_section(page, run)
    return page


def _stage_section(page: Page, stage: int, metrics: dict, teacher_name, teacher,
                   teacher_m: dict) -> None:
    page.h2("Stage 1 vs stage 2: test metrics", "stages")
    test = metrics.get("test") or {}
    if not test:
        page.missing("no test metrics (metrics.json missing or without 'test')")
        return
    series = {}
    if stage == 2:
        if teacher_name is None:
            page.missing("no teacher: a one-stage run (stage2.teacher is empty), so there is "
                         "no stage-1 run to compare with")
        elif teacher is None:
            page.missing(f"the teacher {teacher_name} (config.yaml stage2.teacher) has no "
                         "metrics.json here: stage-2 metrics alone")
        elif teacher_m.get("test"):
            series[f"stage 1: {teacher_m.get('model', '')} (teacher {teacher.name})"] = \
                teacher_m["test"]
        series["stage 2 (this run)"] = test
    else:
        page.p("a stage-1 run: its own test metrics (a stage-2 run's report compares it with "
               "its teacher)")
        series["stage 1 (this run)"] = test
    ks = ks_of(test)
    if ks:
        absent = [k for k in (5, 10, 20, 50) if k not in ks]
        if absent:
            page.missing(f"evaluated at K = {', '.join(map(str, ks))} (eval.ks); "
                         f"K = {', '.join(map(str, absent))} not evaluated")
        page.figure(plots.stages, "stages.png", "test Recall@K and NDCG@K at the kept epoch",
                    series, ks)
    labels = list(series)
    rows = []
    for name in METRIC_NAMES:
        for k in ks:
            vals = [series[s].get(f"{name}@{k}") for s in labels]
            row = [f"{name}@{k}", *vals]
            if len(vals) == 2:
                row.append(None if None in vals else vals[1] - vals[0])
            rows.append(row)
    page.table(["test metric", *labels, *(["stage 2 - stage 1"] if len(labels) == 2 else [])],
               rows)


def _cost_section(page: Page, stage: int, metrics: dict, teacher_m: dict) -> None:
    page.h2("Trainable parameters and time", "cost")
    params = metrics.get("params")
    rows = []
    if isinstance(params, dict):
        for group, p in params.items():
            if isinstance(p, dict):
                rows.append([group, p.get("trainable"), p.get("total"), p.get("trainable_pct")])
    if metrics.get("trainable_params") is not None:
        rows.append(["all trainable (this run)", metrics["trainable_params"], None, None])
    if teacher_m.get("trainable_params") is not None:
        rows.append(["stage 1 teacher (recommender)", teacher_m["trainable_params"], None, None])
    if rows:
        page.table(["parameters", "trainable", "total", "trainable %"], rows)
    else:
        page.missing("no parameter counts (metrics.json 'params' / 'trainable_params')")
    keys = ["seconds", "epochs_run", *sorted(k for k in metrics if k.endswith("_s_mean")),
            "peak_rss_mb", "world_size", "bf16"]
    both = bool(teacher_m) and stage == 2
    for k in sorted(teacher_m):
        if both and k.endswith("_s_mean") and k not in keys:
            keys.insert(2, k)
    rows = [[k, metrics.get(k), *([teacher_m.get(k)] if both else [])] for k in keys
            if metrics.get(k) is not None or (both and teacher_m.get(k) is not None)]
    if rows:
        page.table(["time / resources", "this run", *(["stage 1 teacher"] if both else [])],
                   rows)
        page.p("seconds: the whole run; *_s_mean: mean seconds per epoch of each phase; "
               "peak_rss_mb: the main process's peak resident memory")


def _diagnose_section(page: Page, run: Path) -> None:
    page.h2("Diagnosis (ptmrec diagnose)", "diagnose")
    path = run / "diagnose.json"
    if not path.is_file():
        page.missing(f"no diagnose.json in {run}: run `ptmrec diagnose {run}` to add the "
                     "CKA and co-interaction AUC of frozen and adapted features")
        return
    data = _json(path)
    rows = data.get("rows") if isinstance(data, dict) else None
    need = ("features", "modality", "cka_item_embedding", "auc_cointeraction")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(k in r for k in need) for r in rows):
        page.missing(f"{path} is not in the expected shape (a 'rows' list with "
                     f"{', '.join(need)}); not shown")
        return
    page.p(f"stage {data.get('stage', '?')}, {data.get('pairs', '?')} item pairs for the AUC")
    table = []
    for r in rows:
        probes = r.get("probe_accuracy")
        probes = ", ".join(f"{a}: {fmt(v, 3)}" for a, v in probes.items()) \
            if isinstance(probes, dict) else None
        table.append([r["features"], r["modality"], r["cka_item_embedding"],
                      r["auc_cointeraction"], probes])
    page.table(["features", "modality", "CKA with item embeddings", "co-interaction AUC",
                "probe accuracy"], table)
    extra = [("AUC of the recommender's own item representations", "auc_item_representations"),
             ("probe chance", "probe_chance")]
    for label, key in extra:
        if isinstance(data.get(key), dict):
            page.p(f"{label}: " + ", ".join(f"{k}: {fmt(v, 3)}" for k, v in data[key].items()))
    for note in data.get("notes") or []:
        page.p(f"note: {note}")
    page.figure(plots.diagnose, "diagnose.png",
                "CKA and co-interaction AUC, frozen against adapted features", rows)

"""``ptmrec report``: a self-contained report.html (+ PNGs) of a run folder (the small demo's
stage-2 run, with and without its teacher and a diagnose.json), a sweep folder, bench JSONs
(claims.json, ml100k.json), and bad targets (exit 2 naming the path). The page is rendered with
headless Chromium and the screenshot checked for content."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ptmrec_dist.cli import main
from ptmrec_dist.errors import InputError
from ptmrec_dist.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
DATA_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def read(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def check_self_contained(out: Path, n_figures: int) -> str:
    """Every PNG beside the page is inlined (as itself), nothing points at the network."""
    import base64
    page = read(out)
    inlined = DATA_PNG.findall(page)
    pngs = sorted(out.glob("*.png"))
    assert len(inlined) == len(pngs) == n_figures, (len(inlined), [p.name for p in pngs])
    assert sorted(base64.b64decode(x) for x in inlined) == sorted(p.read_bytes() for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
               for p in pngs)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I), "network ref"
    assert "<link" not in page and "<script" not in page and "@import" not in page
    return page


def sections(page: str) -> list[str]:
    return re.findall(r'<h2 id="([^"]+)">', page)


def rows(page: str) -> list[list[str]]:
    """Every table row of the page as its cells' (unescaped) texts."""
    import html
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", page)]


def copy_run(src: Path, dst: Path, teacher: str | None = None) -> Path:
    """The run's config/log/metrics only (the demo fixture is not changed)."""
    dst.mkdir(parents=True)
    for name in ("config.yaml", "log.jsonl", "metrics.json"):
        shutil.copy(src / name, dst / name)
    if teacher is not None:
        cfg = (dst / "config.yaml").read_text()
        cfg, n = re.subn(r"(?m)^  teacher: .*$", f"  teacher: {teacher}", cfg)
        assert n == 1
        (dst / "config.yaml").write_text(cfg)
    return dst


def diagnose_json(run: Path) -> dict:
    data = {"run": str(run), "stage": 2, "pairs": 500, "notes": ["a <script>x</script> note"],
            "auc_item_representations": {"frozen": 0.61, "adapted": 0.64},
            "rows": [{"features": f, "modality": m, "cka_item_embedding": c,
                      "auc_cointeraction": a, "probe_accuracy": p}
                     for f, m, c, a, p in (
                         ("frozen", "image", 0.312, 0.553, {"colour": 0.41, "category": 0.22}),
                         ("frozen", "text", 0.287, 0.571, None),
                         ("adapted", "image", 0.455, 0.602, {"colour": 0.52, "category": 0.31}),
                         ("adapted", "text", None, 0.588, None))]}
    (run / "diagnose.json").write_text(json.dumps(data))
    return data


# -- a run folder -----------------------------------------------------------------------------

def test_stage2_run_report_of_the_demo(demo, tmp_path, capsys):
    out_dir, _ = demo
    run, out = out_dir / "stage2", tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and str(out / "report.html") in line and "3 figures" in line
    page = check_self_contained(out, 3)
    assert {p.name for p in out.glob("*.png")} == {"losses.png", "valid.png", "stages.png"}
    assert sections(page) == ["losses", "valid", "stages", "cost", "diagnose"]
    metrics = json.loads((run / "metrics.json").read_text())
    teacher = json.loads((out_dir / "stage1" / "metrics.json").read_text())
    # the loss terms the log carries, the kept epoch, both stages' test metrics side by side
    assert "terms logged: loss, bpr, reg, kt" in page
    table = rows(page)
    assert ["kept (best) epoch", str(metrics["best_epoch"])] in table
    # the kept epoch, whichever it is (the small demo's best epoch differs between CPUs of this
    # machine kind: -1 on one, 1 on another, from last-bit differences on a 60-user valid set)
    assert f"the kept epoch {metrics['best_epoch']}" in page
    t20, s20 = teacher["test"]["recall@20"], metrics["test"]["recall@20"]
    assert ["recall@20", f"{t20:.4f}", f"{s20:.4f}", f"{s20 - t20:.4f}"] in table
    assert len([r for r in table if re.fullmatch(r"(recall|ndcg|precision|map|hit)@\d+",
                                                 r[0])]) == 20
    assert "teacher stage1" in page and "not evaluated" not in page   # K = 5/10/20/50 all there
    # parameters and time of both stages
    backbone = metrics["params"]["backbone"]
    assert ["backbone", str(backbone["trainable"]), str(backbone["total"]),
            f"{backbone['trainable_pct']:.4f}"] in table
    assert ["stage 1 teacher (recommender)", str(teacher["trainable_params"]), "-", "-"] in table
    assert ["seconds", f"{metrics['seconds']:.4f}", f"{teacher['seconds']:.4f}"] in table
    assert "no diagnose.json in" in page and 'class="missing"' in page
    # the default folder: RUN/report (a copy, the fixture stays as it is)
    copy = copy_run(run, tmp_path / "copy")
    assert write_report(copy).endswith("(stage-2 run copy: 3 figures, the PNGs beside it)")
    assert (copy / "report" / "report.html").is_file()


def test_run_with_diagnose_and_a_missing_teacher(demo, tmp_path):
    out_dir, _ = demo
    run = copy_run(out_dir / "stage2", tmp_path / "run", teacher=str(tmp_path / "gone"))
    data = diagnose_json(run)
    write_report(run)
    out = run / "report"
    page = check_self_contained(out, 4)
    assert (out / "diagnose.png").is_file()
    assert f"the teacher {tmp_path / 'gone'} (config.yaml stage2.teacher) has no" in page
    assert "stage 2 - stage 1" not in page and "stage 2 (this run)" in page
    row = data["rows"][2]
    table = rows(page)
    assert ["adapted", "image", "0.4550", "0.6020", "colour: 0.520, category: 0.310"] in table
    assert ["adapted", "text", "-", "0.5880", "-"] in table
    assert ["frozen", "text", "0.2870", "0.5710", "-"] in table
    assert row["features"] == "adapted"
    assert "frozen: 0.610, adapted: 0.640" in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page   # escaped


def test_stage1_run_with_other_ks_says_which_were_evaluated(tmp_path):
    run = tmp_path / "s1"
    run.mkdir()
    valid = [{"recall@10": 0.1 + e / 50, "recall@20": 0.2 + e / 40, "ndcg@10": 0.05 + e / 90,
              "ndcg@20": 0.07 + e / 80} for e in range(4)]
    (run / "log.jsonl").write_text("".join(
        json.dumps({"epoch": e, "loss": 1 - e / 10, "bpr": 0.7 - e / 20, "reg": 3 - e / 5,
                    "epoch_s": 0.1, "valid": valid[e], "best": e < 3, "elapsed_s": e}) + "\n"
        for e in range(4)))
    (run / "metrics.json").write_text(json.dumps({
        "model": "bpr", "metric": "recall@20", "best_epoch": 2, "valid": valid[2],
        "test": {"recall@10": 0.123, "recall@20": 0.234, "ndcg@10": 0.0456, "ndcg@20": 0.0567},
        "epochs_run": 4, "trainable_params": 1234, "seconds": 1.5}))
    write_report(run, tmp_path / "out")
    page = check_self_contained(tmp_path / "out", 3)
    assert "evaluated at K = 10, 20 (eval.ks); K = 5, 50 not evaluated" in page
    assert "a stage-1 run: its own test metrics" in page
    assert ["recall@20", "0.2340"] in rows(page)
    assert "terms logged: loss, bpr, reg" in page and "kt" not in re.findall(r"terms logged[^<]*",
                                                                             page)[0]
    assert ["kept (best) epoch", "2"] in rows(page)


# -- a sweep folder ---------------------------------------------------------------------------

RESULTS_CSV = """\
trial,status,stopped_early,stopped_by,stage2.kt_weight,peft.method,epochs_run,best_epoch,\
valid/recall@20,valid/recall@10,test/recall@20,test/recall@10,wall_s,retries,error
a0001_00000,completed,False,,0.1,prompt,3,2,0.2011,0.1100,0.1900,0.1000,12.5,0,
a0001_00001,completed,False,,1.0,lora,3,1,0.2544,0.1300,0.2400,0.1200,13.1,0,
a0001_00002,stopped,True,asha,10.0,prompt,1,0,0.1500,0.0800,0.1400,0.0700,4.2,0,
a0001_00003,error,False,,10.0,lora,0,,,,,,1.0,2,RuntimeError: boom
"""


def make_sweep(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "results.csv").write_text(RESULTS_CSV)
    (root / "summary.json").write_text(json.dumps({"metric": "valid/recall@20", "trials": 4}))
    (root / "best.yaml").write_text("# best trial of tuning/x.yaml (a0001_00001): valid/recall@20"
                                    " 0.254400 at epoch 1\n# searched: stage2.kt_weight=1.0, "
                                    "peft.method=lora\nseed: 0\n")
    return root


def test_sweep_folder(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    summary = write_report(sweep)
    out = sweep / "report"
    assert str(out / "report.html") in summary and "2 figures" in summary
    page = check_self_contained(out, 2)
    assert {p.name for p in out.glob("*.png")} == {"sweep-stage2.kt_weight.png",
                                                    "sweep-peft.method.png"}
    assert sections(page) == ["best", "params", "trials"]
    assert "4 trials (2 completed, 1 stopped early, 1 failed); searched: stage2.kt_weight, " \
           "peft.method; chosen on valid/recall@20" in page
    table = rows(page)
    assert table[:7] == [["best trial", "value"], ["trial", "a0001_00001"],
                         ["stage2.kt_weight", "1"], ["peft.method", "lora"],
                         ["valid/recall@20", "0.2544"], ["test/recall@20", "0.2400"],
                         ["best epoch", "1"]]
    assert ["a0001_00002", "stopped", "10", "prompt", "0.1500", "0.1400", "1", "0",
            "4.2000", "-"] in table
    assert "# searched: stage2.kt_weight=1.0, peft.method=lora" in page
    assert "RuntimeError: boom" in page


# -- bench JSONs -----------------------------------------------------------------------------

def claims_json(path: Path) -> Path:
    """The shape bench/claims.py writes (two claims with intervals, one with too few runs)."""
    claims = [
        {"claim": 1, "model": "vbpr", "statement": "PTMRec beats frozen features", "a": "ptmrec",
         "b": "frozen", "expected": True, "n_runs": 12, "mean_diff": 0.0123,
         "relative_pct": 5.4, "ci95": [0.0041, 0.0201], "p_one_sided": 0.001,
         "runs": [[0, 0]], "p_holm": 0.004, "verdict": "holds"},
        {"claim": 5, "model": "vbpr", "statement": "joint full fine-tuning beats frozen",
         "a": "joint-full", "b": "frozen", "expected": False, "n_runs": 6, "mean_diff": -0.0310,
         "relative_pct": -13.0, "ci95": [-0.0452, -0.0170], "p_one_sided": 0.99,
         "runs": [[0, 0]], "p_holm": 0.99, "verdict": "not shown"},
        {"claim": 3, "model": "vbpr", "statement": "knowledge transfer helps", "a": "ptmrec",
         "b": "ptmrec-no-kt", "expected": True, "n_runs": 1}]
    arms = {"vbpr/frozen": {"n": 12, "mean": 0.2281, "std": 0.0102, "best_epochs": [3, 4],
                            "epoch_minus1_kept": 0, "threads": [2], "commits": ["abc"],
                            "se_rel_pct": 4.26}}
    headroom = [{"model": "vbpr", "a": "oracle", "b": "frozen", "measures": "the gap",
                 "n_runs": 6, "mean_diff": 0.05, "relative_pct": 21.9, "ci95": [0.04, 0.06]},
                {"model": "vbpr", "a": "ptmrec", "b": "frozen", "measures": "the gain",
                 "n_runs": 12, "mean_diff": 0.0123, "relative_pct": 5.4, "ci95": [0.0041, 0.0201],
                 "share_of_gap": 0.246}]
    path.write_text(json.dumps({"items": 800, "users": 1600, "data_seeds": [0, 1, 2],
                                "inits": [0, 1, 2, 3], "control_inits": [0, 1],
                                "models": ["vbpr"], "overrides": [], "arms": arms,
                                "headroom": headroom,
                                "claims": claims, "markdown": "|...|", "seconds": 1.0}))
    return path


def ml100k_json(path: Path) -> Path:
    """The shape bench/ml100k.py writes (stage-2 rows with vs_frozen / vs_control)."""
    def ms(v):
        return {"mean": v, "std": 0.01, "runs": [v]}

    def t(mean, lo, hi, n=3):
        return {"mean": mean, "lo": lo, "hi": hi, "n": n}
    stage1 = {"full/vbpr-both": {**{k: ms(0.2) for k in ("recall@10", "recall@20", "ndcg@10",
                                                         "ndcg@20")},
                                 "seeds": [0, 1, 2], "best_epochs": [5, 6, 7], "chosen": [],
                                 "wall_s": 40.0}}
    stage2 = {"full/ptmrec-both": {"recall@20": ms(0.2211), "ndcg@20": ms(0.1011),
                                   "seeds": [0, 1, 2], "best_epochs": [1, 2, 2], "chosen": [],
                                   "wall_s": 300.0, "trainable_backbone_pct": 0.05,
                                   "vs_frozen": {"recall@20": t(0.0123, 0.0031, 0.0215),
                                                 "ndcg@20": t(0.0044, -0.0010, 0.0098)},
                                   "vs_control": {"recall@20": t(0.0020, -0.0040, 0.0080),
                                                  "ndcg@20": t(0.0010, -0.0020, 0.0040)},
                                   "vs_no_kt": {"recall@20": t(0.0031, 0.0001, 0.0061),
                                                "ndcg@20": t(0.0012, -0.0001, 0.0025)}},
              "sparse/joint-full-both": {"recall@20": ms(0.1), "ndcg@20": ms(0.05),
                                         "seeds": [0], "best_epochs": [0], "chosen": [],
                                         "wall_s": 90.0, "trainable_backbone_pct": 100.0,
                                         "vs_frozen": {"recall@20": t(-0.02, None, None, 1),
                                                       "ndcg@20": t(-0.01, None, None, 1)}}}
    path.write_text(json.dumps({"inputs": {}, "seeds": [0, 1, 2], "markdown": "|...|",
                                "summary": {"stage1": stage1, "stage2": stage2},
                                "seconds": 1.0}))
    return path


def test_claims_json(tmp_path):
    path = claims_json(tmp_path / "claims.json")
    assert "(claims (claims.json): 1 figure, the PNGs beside it)" in write_report(path)
    out = tmp_path / "claims-report"                      # beside the JSON
    page = check_self_contained(out, 1)
    assert (out / "forest.png").is_file() and \
        sections(page) == ["forest", "claims", "headroom", "arms"]
    table = rows(page)
    assert ["1", "PTMRec beats frozen features", "vbpr", "ptmrec vs frozen", "12", "+0.0123",
            "+5.4 %", "[+0.0041, +0.0201]", "0.0040", "expected", "holds"] in table
    assert ["5", "joint full fine-tuning beats frozen", "vbpr", "joint-full vs frozen", "6",
            "-0.0310", "-13.0 %", "[-0.0452, -0.0170]", "0.9900", "expected not to hold",
            "not shown"] in table
    assert ["3", "knowledge transfer helps", "vbpr", "ptmrec vs ptmrec-no-kt", "1", "-", "-",
            "-", "-", "expected", "too few runs"] in table
    assert ["vbpr/frozen", "12", "0.2281 ± 0.0102", "4.3 %", "[3, 4]", "0"] in table
    assert ["vbpr", "ptmrec - frozen", "the gain", "12", "+0.0123", "+5.4 %",
            "[+0.0041, +0.0201]", "25 %"] in table
    assert ["vbpr", "oracle - frozen", "the gap", "6", "+0.0500", "+21.9 %",
            "[+0.0400, +0.0600]", "-"] in table


def test_ml100k_json(tmp_path):
    path = ml100k_json(tmp_path / "ml100k.json")
    write_report(path, tmp_path / "r")
    page = check_self_contained(tmp_path / "r", 1)
    assert sections(page) == ["forest", "stage2", "stage1"]
    # with bench/ml100k.py's claims (paper_claims): their table, as claims.json's
    data = json.loads(path.read_text())
    data["claims"] = {"arms": {}, "markdown": "", "claims": [
        {"claim": 1, "statement": "PTMRec beats frozen features", "model": "sparse/text",
         "a": "ptmrec", "b": "frozen", "expected": True, "n_runs": 5, "mean_diff": 0.0041,
         "relative_pct": 3.0, "ci95": [0.0006, 0.0076], "p_one_sided": 0.01, "p_holm": 0.04,
         "verdict": "holds"}]}
    path.write_text(json.dumps(data))
    write_report(path, tmp_path / "r2")
    page2 = check_self_contained(tmp_path / "r2", 1)
    assert sections(page2) == ["forest", "claims", "stage2", "stage1"]
    assert ["1", "PTMRec beats frozen features", "sparse/text", "ptmrec vs frozen", "5",
            "+0.0041", "+3.0 %", "[+0.0006, +0.0076]", "0.0400", "expected", "holds"] in \
        rows(page2)
    table = rows(page)
    assert ["full/ptmrec-both", "0.2211 ± 0.0100", "0.1011 ± 0.0100",
            "+0.0123 [+0.0031, +0.0215]", "+0.0044 [-0.0010, +0.0098]", "0.0500", "3",
            "[1, 2, 2]"] in table
    assert ["full/ptmrec-both minus ptmrec-no-kt", "-", "-", "+0.0031 [+0.0001, +0.0061]",
            "+0.0012 [-0.0001, +0.0025]", "-", "3", "-"] in table
    assert ["full/ptmrec-both minus frozen-backbone-kt", "-", "-", "+0.0020 [-0.0040, +0.0080]",
            "+0.0010 [-0.0020, +0.0040]", "-", "3", "-"] in table
    assert ["sparse/joint-full-both", "0.1000 ± 0.0100", "0.0500 ± 0.0100", "-0.0200 -",
            "-0.0100 -", "100", "1", "[0]"] in table           # one seed: no interval
    assert ["full/vbpr-both", *["0.2000 ± 0.0100"] * 4, "3", "[5, 6, 7]", "40"] in table


# -- bad targets -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "empty-folder", "other-json", "broken-json",
                                  "text-file", "bad-csv"])
def test_bad_target_exits_2_naming_the_path(case, tmp_path, caplog):
    target = tmp_path / "t"
    if case == "empty-folder":
        target.mkdir()
    elif case == "other-json":
        target = tmp_path / "x.json"
        target.write_text(json.dumps({"hello": 1}))
    elif case == "broken-json":
        target = tmp_path / "x.json"
        target.write_text('{\n"claims": [\n')
    elif case == "text-file":
        target = tmp_path / "notes.txt"
        target.write_text("hi")
    elif case == "bad-csv":
        target.mkdir()
        (target / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as exc:
        write_report(target)
    assert str(target) in str(exc.value)
    expect = {"missing": "no such file or folder", "empty-folder": "neither metrics.json",
              "other-json": "neither claims.json", "broken-json": "x.json:3: not valid JSON",
              "text-file": "expected a run folder", "bad-csv": "results.csv:1: expected the "
                                                               "columns"}[case]
    assert expect in str(exc.value)
    assert main(["report", str(target)]) == 2
    assert not (tmp_path / "t" / "report" / "report.html").exists()


# -- the page in a browser -------------------------------------------------------------------

def test_chromium_renders_the_page(request, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("PTMREC_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{CHROMIUM} is missing and PTMREC_REQUIRE_CHROMIUM=1")
        pytest.skip(f"{CHROMIUM} is missing: the headless screenshot of report.html is skipped")
    import numpy as np
    from PIL import Image

    out_dir, _ = request.getfixturevalue("demo")    # built only when the test runs
    run = copy_run(out_dir / "stage2", tmp_path / "run")
    diagnose_json(run)
    write_report(run)
    html_file = run / "report" / "report.html"
    check_self_contained(html_file.parent, 4)
    shot, profile = tmp_path / "shot.png", tmp_path / "profile"
    profile.mkdir()
    res = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1280,2400", html_file.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50                      # text, tables, coloured curves
    dark = (img.sum(axis=2) < 200).mean()         # text and axes
    non_white = (img.min(axis=2) < 240).mean()
    assert dark > 0.002 and 0.02 < non_white < 0.9, (dark, non_white)
    blue = ((img[..., 2] > 150) & (img[..., 0] < 80)).sum()   # tab:blue lines and bars
    assert blue > 500

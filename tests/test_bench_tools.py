"""`make bench`'s own tooling: every benchmark has a `make bench` size, results carry their
provenance, and bench/README.md is generated from whatever results exist (benchmarks report;
these tests check the plumbing, never a timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from run_fixtures import child_env

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture()
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("run_all", "_readme", "_util", "scaling"):
        sys.modules.pop(name, None)
    import _readme
    import _util
    import run_all
    import scaling
    return run_all, _readme, _util, scaling


def test_every_benchmark_has_a_make_bench_size(bench_modules):
    run_all, *_ = bench_modules
    names = {p.name for p in run_all.scripts()}
    assert "eval_reference.py" in names and "scaling.py" in names
    assert names == set(run_all.QUICK), names ^ set(run_all.QUICK)
    assert not any(n.startswith(("gpu", "_")) for n in names)      # gpu.py: the GPU machine's


def test_gpu_script_runs_its_whole_flow_on_a_cpu(bench_modules, tmp_path):
    """bench/gpu.py (issue 21's prepared GPU script; no GPU here): ``--device cpu`` on the tiny
    preset runs every part, each in its own process, and bench/README.md lists its figures."""
    import subprocess

    _, readme, *_ = bench_modules
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--preset",
                          "tiny", "--items", "24", "--workers", "0", "--work",
                          str(tmp_path / "work"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {r["part"]: r for r in json.loads((out / "gpu.json").read_text())["rows"]}
    assert set(rows) == {"matmul", "tower", "extract", "stage2", "nccl"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["tower"]["result"]["share_of_matmul"] > 0
    assert rows["extract"]["result"]["items_per_s"] > 0
    stage2 = rows["stage2"]["result"]
    assert {(x["method"], x["checkpointing"]) for x in stage2} == \
        {(m, c) for m in ("prompt", "full") for c in (False, True)}
    full = next(x for x in stage2 if x["method"] == "full" and not x["checkpointing"])
    assert full["peak_vs_full"] == 1.0 and full["time_vs_full"] == 1.0
    prompt = next(x for x in stage2 if x["method"] == "prompt" and not x["checkpointing"])
    assert prompt["trainable"] < full["trainable"]
    text = readme.render(out, tmp_path / "README.md")
    assert "gpu stage-2 step, prompt, checkpointing off" in text
    assert "gpu gloo all-reduce, 1 rank" in text and "img/s" in text


def test_results_carry_provenance_and_the_readme_lists_every_figure(bench_modules, tmp_path):
    _, readme, util, _ = bench_modules
    util.write_result(tmp_path, "eval_reference", {"runs": [
        {"users": 19445, "items": 7050, "ours_s": 0.65, "mmrec_s": 3.21, "speedup": 4.94,
         "max_abs_metric_diff": 1e-14}]})
    util.write_result(tmp_path, "something_new", {"a": {"b": 1.5}, "flag": True, "c": 2})
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "scaling.png").write_bytes(b"\x89PNG")
    data = json.loads((tmp_path / "eval_reference.json").read_text())
    prov = data["_provenance"]
    assert {"date", "argv", "commit", "torch_threads", "cpus", "cpu", "cpu_capability",
            "versions"} <= set(prov)
    assert prov["versions"]["torch"]
    out = tmp_path / "README.md"
    text = readme.render(tmp_path, out)
    row = next(line for line in text.splitlines() if "speed-up" in line)
    assert "19,445 users x 7,050 items" in row and ">= 3x" in row and "4.94x" in row
    assert f"{prov['torch_threads']} threads" in row and prov["date"][:10] in row
    assert "| something_new | a.b |  | 1.5 |" in text and "| something_new | c |  | 2 |" in text
    assert "flag" not in text                          # booleans are not figures
    assert "| broken | unreadable:" in text
    assert "[scaling.png](scaling.png)" in text


def test_the_recorded_commit_is_the_one_the_process_loaded():
    """Provenance asks git when ``ptmrec_dist.run`` is imported, not when a run ends: a bench
    that trains for an hour while commits land must record the code it runs (it recorded the
    commit of the moment its first run ended). The child breaks ``subprocess.run`` after the
    import: the commit must still be there."""
    import subprocess

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    code = ("import subprocess, ptmrec_dist.run as run\n"
            "subprocess.run = None   # any git call from now on fails\n"
            "print(run.machine_provenance()['commit'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(ROOT), env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = head.stdout.strip() if head.returncode == 0 else "None"
    assert proc.stdout.strip().splitlines()[-1] == expected


def test_empty_results_say_how_to_make_them(bench_modules, tmp_path):
    _, readme, *_ = bench_modules
    assert "run `make bench`" in readme.render(tmp_path, tmp_path / "README.md")


def test_scaling_exponent_fit(bench_modules):
    *_, scaling = bench_modules
    runs = [{"step": "shard", "items": n, "seconds": 2e-4 * n} for n in (1000, 10000, 100000)]
    runs += [{"step": "knn-graph", "items": n, "seconds": 1e-8 * n * n} for n in (1000, 10000)]
    runs += [{"step": "extract", "items": 1000, "seconds": 1.0}]        # one size: no fit
    fit = scaling.fit(runs)
    assert fit["shard"]["exponent"] == pytest.approx(1.0, abs=1e-3)
    assert fit["shard"]["goal"] == "<= 1.1" and fit["shard"]["sizes"] == [1000, 10000, 100000]
    assert fit["knn-graph"]["exponent"] == pytest.approx(2.0, abs=1e-3)
    assert fit["knn-graph"]["goal"] == ""
    assert "extract" not in fit


def test_ml100k_pairs_runs_by_seed(monkeypatch, tmp_path):
    """bench/ml100k.py's summary pairs each stage-2 arm with frozen (its stage-1 teacher), the
    frozen-backbone-kt control and, for ptmrec, ptmrec-no-kt, per seed present in both."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("ml100k", None)
    import ml100k

    def run(path: Path, r20: float, n20: float) -> None:
        path.mkdir(parents=True)
        test = {"recall@10": r20 / 2, "recall@20": r20, "ndcg@10": n20 / 2, "ndcg@20": n20}
        path.joinpath("bench.json").write_text(json.dumps(
            {"test": test, "best_epoch": 1, "wall_s": 1.0,
             "params": {"backbone": {"trainable_pct": 0.02}}}))

    base = {0: 0.10, 1: 0.12, 2: 0.11}
    for seed, r in base.items():
        s = tmp_path / "sparse" / f"seed{seed}"
        run(s / "stage1" / "vbpr-text", r, r / 2)
        run(s / "stage2" / "ptmrec-text", r + 0.01 + seed * 0.001, r / 2)
        if seed != 2:                                # no-KT missing for seed 2: not paired
            run(s / "stage2" / "ptmrec-no-kt-text", r + 0.004, r / 2 + 0.001)
        run(s / "stage2" / "frozen-backbone-kt-text", r, r / 2)
    summary = ml100k.collect(tmp_path, [0, 1, 2])
    row = summary["stage2"]["sparse/ptmrec-text"]
    assert row["vs_frozen"]["recall@20"]["diffs"] == pytest.approx([0.010, 0.011, 0.012])
    assert row["vs_frozen"]["recall@20"]["lo"] < 0.011 < row["vs_frozen"]["recall@20"]["hi"]
    assert row["vs_no_kt"]["recall@20"]["seeds"] == [0, 1]
    assert row["vs_no_kt"]["recall@20"]["diffs"] == pytest.approx([0.006, 0.007])
    assert row["vs_no_kt"]["ndcg@20"]["mean"] == pytest.approx(-0.001)
    assert row["vs_control"]["recall@20"]["n"] == 3
    no_kt = summary["stage2"]["sparse/ptmrec-no-kt-text"]
    assert "vs_no_kt" not in no_kt and no_kt["vs_control"]["recall@20"]["n"] == 2
    assert "vs_control" not in summary["stage2"]["sparse/frozen-backbone-kt-text"]
    md = ml100k.markdown(summary)
    assert "| sparse/ptmrec-text **minus ptmrec-no-kt** | | | +0.0065 [" in md


def test_ml100k_paper_claims_pair_runs_by_seed_with_per_user_bootstrap(monkeypatch, tmp_path):
    """bench/ml100k.py runs claims.py's statistics: stage-1 vbpr is the frozen arm, stage-2
    methods are arms, per variant/modalities; claims whose arms did not run say so; a clear
    gain holds after Holm, no difference does not."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("ml100k", "claims"):
        sys.modules.pop(name, None)
    import ml100k
    rng = np.random.default_rng(0)

    def run(path: Path, per_user: np.ndarray) -> None:
        path.mkdir(parents=True)
        r20 = float(per_user.mean())
        path.joinpath("bench.json").write_text(json.dumps(
            {"test": {"recall@20": r20, "ndcg@20": r20 / 2}, "best_epoch": 3}))
        np.savez(path / "per_user.npz", users=np.arange(len(per_user)), **{
            "recall@20": per_user, "ndcg@20": per_user / 2})

    for seed in range(4):
        base = rng.uniform(0, 0.3, size=300)
        s = tmp_path / "sparse" / f"seed{seed}"
        run(s / "stage1" / "vbpr-text", base)
        run(s / "stage1" / "pop-both", base / 2)                    # not an arm
        ptmrec = base + 0.05 + rng.normal(0, 0.01, 300)
        run(s / "stage2" / "ptmrec-text", ptmrec)
        run(s / "stage2" / "frozen-backbone-kt-text", base + rng.normal(0, 0.01, 300))
        run(s / "stage2" / "ptmrec-no-kt-text", ptmrec + rng.normal(0, 0.01, 300))
    run(tmp_path / "sparse" / "seed9" / "stage1" / "vbpr-text", np.full(300, 0.9))  # not asked
    paper = ml100k.paper_claims(tmp_path, [0, 1, 2, 3])
    rows = {c["claim"]: c for c in paper["claims"]}
    assert set(paper["arms"]) == {"sparse/text/frozen", "sparse/text/ptmrec",
                                  "sparse/text/frozen-backbone-kt", "sparse/text/ptmrec-no-kt"}
    assert paper["arms"]["sparse/text/frozen"]["n"] == 4
    assert rows[1]["model"] == "sparse/text" and rows[1]["n_runs"] == 4
    assert rows[1]["mean_diff"] == pytest.approx(0.05, abs=0.003)
    assert rows[1]["ci95"][0] > 0.04 and rows[1]["verdict"] == "holds"
    assert rows[2]["mean_diff"] == pytest.approx(0.05, abs=0.003)
    assert rows[3]["n_runs"] == 4 and rows[3]["verdict"] == "not shown"     # no difference
    assert abs(rows[3]["mean_diff"]) < 0.003 and rows[3]["ci95"][0] < 0 < rows[3]["ci95"][1]
    assert rows[5]["n_runs"] == 0 and "verdict" not in rows[5] and 6 not in rows   # no joint
    assert "too few runs" in paper["markdown"]


def test_one_stage_arms_train_to_convergence_under_stage1s_rule(monkeypatch):
    """The joint arms (no teacher: the recommender from scratch) stop as stage 1 does, not at a
    fixed short budget; bench/ml100k.py keeps its short stage-2 budget for two-stage arms only."""
    from ptmrec_dist.config import load_config
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("ml100k", None)
    import ml100k
    default = load_config(None, [])
    # the two-stage lead's knobs given on a bench's command line (claims.py loads the arm's file
    # over them) leave the one-stage arms at one pass per epoch and ungated features
    lead = load_config(None, ["stage2.passes_per_epoch=3", "stage2.feature_gate=true"])
    for arm in ("joint-prompt", "joint-full", "joint-frozen"):
        cfg = load_config(ROOT / "configs" / "ablations" / f"{arm}.yaml", [], base=lead)
        assert cfg.stage2.teacher == ""
        assert (cfg.stage2.epochs, cfg.stage2.patience) == \
            (default.stage1.epochs, default.stage1.patience * default.stage1.eval_every)
        assert (cfg.stage2.passes_per_epoch, cfg.stage2.feature_gate) == (1, False)
    ml = load_config(ml100k.CONFIG)
    assert ml100k.budget(one_stage=True) == [f"stage2.epochs={ml.stage1.epochs}",
                                             f"stage2.patience={ml.stage1.patience}"]
    assert ml100k.budget(one_stage=False) == [f"stage2.epochs={ml.stage2.epochs}",
                                              f"stage2.patience={ml.stage2.patience}"]
    assert ml.stage2.epochs < ml.stage1.patience     # the two budgets do differ


def test_headroom_features_encode_exactly_the_chosen_attributes(monkeypatch, demo, tmp_path):
    """bench/claims.py's headroom arms: one-hot codes of the attributes each modality shows
    (oracle) or of those the pretraining captions name (caption-visible), scaled to the frozen
    features' mean row norm, rows in item order; a stage-1 run reads them."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("_util", "claims"):
        sys.modules.pop(name, None)
    import _util
    import claims

    out, _ = demo
    truth = json.loads((out / "data" / "truth.json").read_text())
    frozen = out / "features"
    oracle = _util.attribute_features(out / "data", frozen, tmp_path / "oracle", "visible")
    caption = _util.attribute_features(out / "data", frozen, tmp_path / "caption", "caption")
    meta = json.loads((oracle / "meta.json").read_text())
    assert meta["attributes"] == {"image": ["colour", "shape", "pattern"],
                                  "text": ["category", "colour", "shape", "material"]}
    assert json.loads((caption / "meta.json").read_text())["attributes"] == \
        {"image": ["colour"], "text": ["category", "colour"]}
    for modality, attrs in meta["attributes"].items():
        f = np.load(oracle / f"{modality}.npy")
        ref = np.load(frozen / f"{modality}.npy").astype(np.float32)
        assert f.shape == (len(ref), sum(len(truth["vocab"][a]) for a in attrs))
        assert np.allclose(np.linalg.norm(f, axis=1), np.linalg.norm(ref, axis=1).mean(),
                           rtol=1e-5)
        start = 0
        for a in attrs:                           # each block is its attribute's one-hot code
            width = len(truth["vocab"][a])
            block = f[:, start:start + width]
            assert (np.count_nonzero(block, axis=1) == 1).all()
            assert (block.argmax(1) == np.asarray(truth["item_attributes"][a])[:len(f)]).all()
            start += width
    unit = _util.attribute_features(out / "data", frozen, tmp_path / "unit", "visible", "unit")
    assert np.allclose(np.linalg.norm(np.load(unit / "image.npy"), axis=1), 1.0)
    assert (np.load(unit / "text.npy") > 0).sum(1).tolist() == [4] * len(f)
    # reused when complete; a missing truth.json or unknown rule says so
    assert _util.attribute_features(out / "data", frozen, oracle, "visible") == oracle
    with pytest.raises(ValueError, match="rule"):
        _util.attribute_features(out / "data", frozen, tmp_path / "x", "hidden")
    assert claims.kind("oracle") == claims.kind("caption-visible") == "headroom"
    assert claims.kind("oracle-unit") == "headroom"


def test_probe_adapt_reads_every_method_out_the_same_way(monkeypatch, demo):
    """bench/probe_adapt.py: the hidden attributes per modality from truth.json; frozen is the
    ridge readout of the starting features (epoch -1, nothing trained); prompt and full train
    their share of the backbone; a rerun gives the same figures."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("probe_adapt", None)
    import probe_adapt
    from demo_fixtures import SMALL

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.config import load_config

    out, _ = demo
    cfg = load_config(out / "stage1" / "config.yaml", SMALL)
    cfg.backbone.name_or_path = str(out / "backbone")
    inputs = probe_adapt.item_inputs(cfg, load_backbone(cfg.backbone))
    assert probe_adapt.hidden_pairs(inputs) == [("shape", "image"), ("shape", "text"),
                                                ("pattern", "image"), ("material", "text")]
    frozen = probe_adapt.probe_one(cfg, inputs, "frozen", "pattern", "image", 0.0, 3, 0)
    assert frozen["epoch"] == -1 and frozen["trainable_pct"] == 0
    assert frozen["chance"] == pytest.approx(1 / 6) and 0 <= frozen["test"] <= 1
    prompt = probe_adapt.probe_one(cfg, inputs, "prompt", "material", "text", 3e-2, 2, 0)
    assert 0 < prompt["trainable_pct"] < 1 and prompt["epoch"] in (-1, 0, 1)
    assert probe_adapt.probe_one(cfg, inputs, "prompt", "material", "text", 3e-2, 2, 0) == prompt
    full = probe_adapt.probe_one(cfg, inputs, "full", "shape", "image", 1e-3, 1, 0)
    assert 20 < full["trainable_pct"] < 80           # the vision tower, not the text tower


def test_claims_headroom_rows_and_standard_error(monkeypatch):
    """bench/claims.py: oracle - frozen (the gap), frozen - caption-visible, ptmrec - frozen with
    its share of the gap, paired by (data, init) seed; each arm's standard error over users."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("claims", None)
    import claims

    rng = np.random.default_rng(0)
    users = 400
    base = rng.random(users) * 0.2

    def arm(shift: float) -> dict:
        out = {}
        for key in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            pu = {"recall@20": np.clip(base + shift + rng.normal(0, 0.01, users), 0, 1),
                  "ndcg@20": base}
            out[key] = ({"test": {"recall@20": float(pu["recall@20"].mean())}, "best_epoch": 2,
                         "epoch_minus1_kept": False}, pu)
        return out

    runs = {("vbpr", "frozen"): arm(0.0), ("vbpr", "oracle"): arm(0.08),
            ("vbpr", "oracle-unit"): arm(0.10),             # the larger oracle gap counts
            ("vbpr", "caption-visible"): arm(-0.02), ("vbpr", "ptmrec"): arm(0.02),
            ("vbpr", "prompts-only"): arm(0.01)}
    rows = {(h["a"], h["b"]): h for h in claims.evaluate_headroom(runs, ["vbpr"])}
    gap, gain = rows[("oracle", "frozen")], rows[("ptmrec", "frozen")]
    assert gap["n_runs"] == 4 and gap["ci95"][0] > 0.07 and gap["ci95"][1] < 0.09
    assert rows[("frozen", "caption-visible")]["mean_diff"] == pytest.approx(0.02, abs=0.003)
    unit = rows[("oracle-unit", "frozen")]
    assert gain["share_of_gap"] == pytest.approx(gain["mean_diff"] / unit["mean_diff"])
    assert gain["share_of_gap"] == pytest.approx(0.2, abs=0.05)
    assert gain["gap_arm"] == "oracle-unit"
    assert rows[("prompts-only", "frozen")]["mean_diff"] == pytest.approx(0.01, abs=0.003)
    assert rows[("frozen-backbone-kt", "frozen")]["n_runs"] == 0          # not run: no figure
    assert rows[("ptmrec", "two-stage-full-kt")]["n_runs"] == 0
    assert rows[("two-stage-full-kt", "frozen-backbone-kt")]["n_runs"] == 0
    assert list(rows)[-1] == ("ptmrec", "frozen")                      # the gain's row: last
    table = claims.arm_table(runs)
    pu = runs[("vbpr", "frozen")][(0, 0)][1]["recall@20"]
    one = 100 * pu.std(ddof=1) / np.sqrt(users) / pu.mean()
    assert table["vbpr/frozen"]["test_users"] == [users]
    assert one / 2 < table["vbpr/frozen"]["se_rel_pct"] < 2 * one
    md = claims.markdown(table, [], claims.evaluate_headroom(runs, ["vbpr"]))
    assert "| oracle - frozen | vbpr | 4 | +0.08" in md and "% |" in md


def test_redesign_reads_valid_only_and_pairs_runs(monkeypatch):
    """bench/redesign.py: the headroom (oracle-unit - frozen) and the gain (ptmrec - frozen),
    relative to frozen and paired by (data, init) seed; the gain's share of the headroom; a run
    missing from one arm is left out of that pair."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("redesign", "claims", "probe_adapt"):
        sys.modules.pop(name, None)
    import redesign

    valid = {"frozen": {(0, 0): 0.20, (0, 1): 0.22, (1, 0): 0.18},
             "oracle-unit": {(0, 0): 0.24, (0, 1): 0.25, (1, 0): 0.21},
             "ptmrec": {(0, 0): 0.21, (0, 1): 0.23}}
    s = redesign.summarise(valid)
    assert s["arms"]["frozen"] == {"n": 3, "mean": pytest.approx(0.20)}
    assert s["headroom"]["n"] == 3 and s["gain"]["n"] == 2
    assert s["headroom"]["mean"] == pytest.approx(100 * 0.10 / 0.20 / 3)
    assert s["gain"]["mean"] == pytest.approx(100 * 0.01 / 0.21)       # (0,0), (0,1) only
    assert s["headroom"]["lo"] < s["headroom"]["mean"] < s["headroom"]["hi"]
    assert s["share"] == pytest.approx(s["gain"]["mean"] / s["headroom"]["mean"])
    md = redesign.markdown("synthetic.caption_mention_prob", {"0.1": {
        "valid": s, "probe": {"pattern (image)": {"frozen": 0.31, "prompt": 0.45}}}})
    assert "| 0.1 | 0.2000 | +16.7 % [" in md and "| 0.31 | 0.45 |" in md
    bare = redesign.markdown("synthetic.n_items", {"800": {"valid": s, "probe": {}}})
    assert bare.splitlines()[0].endswith("| share |") and "|  |" not in bare
    one = redesign.summarise({"frozen": {(0, 0): 0.2}, "oracle-unit": {(0, 0): 0.3},
                              "ptmrec": {}})
    assert one["headroom"]["lo"] is None and "gain" not in one and "share" not in one
    # --inputs shares one set of inputs: refused for a knob of the inputs, before any work
    monkeypatch.setattr(sys, "argv", ["redesign.py", "--knob", "synthetic.n_items",
                                      "--values", "900", "--inputs", "out/claims-v2"])
    with pytest.raises(SystemExit) as exc:
        redesign.main()
    assert exc.value.code == 2


def test_claims_designs_and_inputs_built_with_other_settings_are_refused(monkeypatch, tmp_path):
    """--design names the items and input overrides (the command line's come after); inputs in
    the work folder built with other synthetic/demo_backbone settings are refused, not reused."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("claims", None)
    import claims

    from ptmrec_dist.config import load_config, save_config
    from ptmrec_dist.demo import demo_config

    ap = claims.input_args(argparse.ArgumentParser())
    ap.add_argument("overrides", nargs="*")
    a = claims.resolve_inputs(ap.parse_args(["stage2.epochs=1"]))
    items, design = claims.DESIGNS["v2"]
    assert a.design == "v2" and a.items == items and a.overrides == [*design, "stage2.epochs=1"]
    assert a.work.endswith("claims-v2")
    b = claims.resolve_inputs(ap.parse_args(["--design", "v1", "--items", "50", "--work", "w"]))
    assert (b.items, b.overrides, b.work) == (50, [], "w")

    inputs = tmp_path / "data0" / "inputs"
    cfg = load_config(None, ["synthetic.n_items=300", "synthetic.n_users=100",
                             "synthetic.seed=0", "data.split_seed=2026",
                             "demo_backbone.corpus_items=40",     # and a run setting of the
                             "stage2.passes_per_epoch=3"],         # call that built them
                      base=demo_config("default"))
    cfg.data.path, cfg.backbone.name_or_path = str(inputs / "data"), str(inputs / "backbone")
    save_config(cfg, inputs)
    (inputs / "config.yaml").rename(inputs / "prepared.yaml")
    got = claims.prepare(tmp_path, 0, 300, 100, ["demo_backbone.corpus_items=40",
                                                 "stage2.epochs=1"])
    assert got.synthetic.n_items == 300 and got.demo_backbone.corpus_items == 40
    assert got.stage2.epochs == 1       # run settings of this call apply to existing inputs
    assert got.stage2.passes_per_epoch == 1       # ... and only this call's: not the builder's
    assert (got.data.path, got.backbone.name_or_path) == (str(inputs / "data"),
                                                          str(inputs / "backbone"))
    with pytest.raises(SystemExit, match=r"data.split: 'auto' there, 'random' asked"):
        claims.prepare(tmp_path, 0, 300, 100, ["demo_backbone.corpus_items=40",
                                               "data.split=random"])
    with pytest.raises(SystemExit, match=r"synthetic.n_items: 300 there, 400 asked.*"
                                         r"demo_backbone.corpus_items: 40 there, 0 asked"):
        claims.prepare(tmp_path, 0, 400, 100, [])


def test_claims_inputs_fingerprint(monkeypatch, tmp_path):
    """The inputs' fingerprint depends on the bytes of the data, the backbone's weights and the
    features, not on configs or logs (which name paths and times), nor on where the inputs lie."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("claims", None)
    import claims

    def build(root):
        for rel, data in (("data/interactions.inter", b"u\ti\n0\t1\n"),
                          ("data/items.jsonl", b"{}\n"), ("data/images/0.png", b"png0"),
                          ("data/config.yaml", str(root).encode()),
                          ("backbone/model.safetensors", b"w" * 64),
                          ("backbone/log.jsonl", b"t=1"),
                          ("features/text.npy", b"t"), ("features/image.npy", b"i")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    a = claims.inputs_fingerprint(build(tmp_path / "a"))
    assert set(a) == {"data", "backbone", "features"} and all(len(v) == 64 for v in a.values())
    b_root = build(tmp_path / "b")
    (b_root / "backbone" / "log.jsonl").write_bytes(b"t=2")        # logs and configs differ
    assert claims.inputs_fingerprint(b_root) == a
    (b_root / "features" / "image.npy").write_bytes(b"I")         # one feature byte differs
    b = claims.inputs_fingerprint(b_root)
    assert b["features"] != a["features"] and (b["data"], b["backbone"]) == (a["data"],
                                                                             a["backbone"])
    (b_root / "data" / "images" / "0.png").rename(b_root / "data" / "images" / "1.png")
    assert claims.inputs_fingerprint(b_root)["data"] != a["data"]  # a renamed image counts
    (b_root / "backbone" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"backbone: none of model.safetensors found"):
        claims.inputs_fingerprint(b_root)


def test_claims_shared_inputs_keep_the_runs_apart(monkeypatch, tmp_path):
    """--inputs WORK2: the inputs (and their fingerprint) come from WORK2, the runs go under
    --work, so another run setting on the same inputs never reuses WORK2's finished runs."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("claims", None)
    import claims

    seen = {}
    monkeypatch.setattr(claims, "prepare", lambda root, d, *a: seen.setdefault("prepare",
                                                                               (root, d)))
    monkeypatch.setattr(claims, "reference_scores", lambda base: {
        name: {"recall@20": 0.1, "ndcg@20": 0.05} for name in ("true-utility", "pop")})
    monkeypatch.setattr(claims, "inputs_fingerprint", lambda p: seen.setdefault("print", p))
    monkeypatch.setattr(claims, "run_one",
                        lambda base, work, d, model, seed, arm: seen.setdefault("run", work))
    monkeypatch.setattr(claims, "load_runs", lambda *a: {})
    monkeypatch.setattr(claims, "plot", lambda *a: None)
    monkeypatch.setattr(claims, "write_result", lambda out, name, r: seen.setdefault("out", r))
    work, shared = tmp_path / "w", tmp_path / "shared"
    monkeypatch.setattr(sys, "argv", ["claims.py", "stage2.text_lr=0.0005", "--work", str(work),
                                      "--inputs", str(shared), "--data-seeds", "1", "--arms",
                                      "frozen", "--inits", "0", "--models", "vbpr"])
    assert claims.main() == 0
    assert seen["prepare"] == (shared, 1) and seen["print"] == shared / "data1" / "inputs"
    assert seen["run"] == work and seen["out"]["inputs"] == str(shared)
    monkeypatch.setattr(sys, "argv", ["claims.py", "--work", str(work), "--inputs", str(work)])
    with pytest.raises(SystemExit) as exc:
        claims.main()
    assert exc.value.code == 2


def test_claims_reference_rankings(monkeypatch, demo):
    """bench/claims.py's no-training rankings on a synthetic set: ranking by each user's true
    utility beats training popularity, and both are proper metrics."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("claims", None)
    import claims

    from ptmrec_dist.config import load_config

    out, _ = demo
    cfg = load_config(out / "stage1" / "config.yaml")
    ref = claims.reference_scores(cfg)
    assert set(ref) == {"true-utility", "pop"}
    for r in ref.values():
        assert 0 <= r["ndcg@20"] <= 1 and 0 <= r["recall@20"] <= 1
    assert ref["true-utility"]["recall@20"] > ref["pop"]["recall@20"]

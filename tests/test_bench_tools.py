"""`make bench`'s own tooling: every benchmark has a `make bench` size, results carry their
provenance, and bench/README.md is generated from whatever results exist (benchmarks report;
these tests check the plumbing, never a timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


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
    assert not any(n.startswith(("gpu_", "_")) for n in names)


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
    assert {"date", "argv", "commit", "torch_threads", "cpus", "versions"} <= set(prov)
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

"""Choose a knob of the synthetic benchmark on valid (issue 18, the redesign): for each value,
the headroom a recommender sees, what PTMRec closes of it, and what a supervised probe says
prompts can make the features encode.

    .venv/bin/python bench/redesign.py --knob synthetic.caption_mention_prob --values 0 0.1 0.3
        [--data-seeds 0] [--inits 0 1] [--model vbpr] [--arms frozen ptmrec oracle-unit]
        [--methods frozen prompt] [--probe-epochs 15] [--design v1] [--items N --users 1600]
        [--work out/redesign] [--inputs DIR] [k=v ...]

Per value ``v`` the inputs of ``bench/claims.py`` are built with ``KNOB=v`` (and the other
overrides) under ``WORK/<knob>=<v>/`` (a knob of the runs, ``stage1.*``, ``stage2.*``,
``peft.*``, ``recommender.*``, is set on the runs only, and every value shares the inputs
under ``WORK/inputs/``, or those of ``--inputs``, e.g. ``out/claims-v2``), and there, per data
seed and init seed, the ``frozen``, ``ptmrec`` and ``oracle-unit`` arms run
(``claims.run_one``; resumable run by run), and per data seed ``probe_adapt``'s probe (frozen
vs prompt by default; ``--arms`` and ``--methods`` trim either: ``--arms frozen oracle-unit
--methods`` is the headroom alone, stage-1 runs of seconds each). **Only valid figures** are
read: valid Recall@20 at the best-valid epoch, the paired run-level differences ``oracle-unit -
frozen`` (the headroom) and ``ptmrec - frozen`` (the gain) relative to frozen, with a t interval
over runs, the gain's share of the headroom, and the probe's valid accuracy per hidden attribute
and modality. The benchmark's design is chosen from these; the test split stays for
``bench/claims.py``. The sweeps start from ``--design v1`` (the generator's defaults; the
knobs that made v2 are passed as overrides). Writes ``OUT/redesign.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _util import t_interval, write_result  # noqa: E402

ARMS = ("frozen", "ptmrec", "oracle-unit")
PAIRS = (("headroom", "oracle-unit"), ("gain", "ptmrec"))     # (name, arm - frozen)
METRIC = "recall@20"
# knobs of the runs, not of the inputs: every value runs on one set of inputs (WORK/inputs)
RUN_KEYS = ("stage1.", "stage2.", "peft.", "recommender.")


def summarise(valid: dict) -> dict:
    """``valid``: {arm: {(data seed, init): valid Recall@20}} -> per-arm means and the paired
    relative differences against frozen (t interval over runs), the gain's share of the
    headroom."""
    out: dict = {"arms": {a: {"n": len(v), "mean": float(np.mean(list(v.values())))}
                          for a, v in valid.items() if v}}
    base = valid.get("frozen", {})
    for name, arm in PAIRS:
        keys = sorted(set(base) & set(valid.get(arm, {})))
        if not keys:
            continue
        ref = float(np.mean([base[k] for k in keys]))
        t = t_interval([(valid[arm][k] - base[k]) / ref for k in keys])
        out[name] = {"n": len(keys), **{k: (None if v is None else 100 * v)
                                        for k, v in t.items() if k in ("mean", "lo", "hi")}}
    if "headroom" in out and "gain" in out and out["headroom"]["mean"] > 0:
        out["share"] = out["gain"]["mean"] / out["headroom"]["mean"]
    return out


def markdown(knob: str, rows: dict) -> str:
    def pct(d):
        if not d:
            return "-"
        ci = "" if d.get("lo") is None else f" [{d['lo']:+.1f}, {d['hi']:+.1f}]"
        return f"{d['mean']:+.1f} %{ci}"
    probes = sorted({(k, m) for r in rows.values() for k, ms in r["probe"].items() for m in ms})
    head = "| " + " | ".join([knob, "frozen valid R@20", "oracle-unit - frozen",
                              "ptmrec - frozen", "share", *(f"{k} {m}" for k, m in probes)]) + " |"
    lines = [head, "|" + "---|" * (5 + len(probes))]
    for v, r in rows.items():
        s = r["valid"]
        share = "-" if "share" not in s else f"{s['share']:.2f}"
        frozen = s["arms"].get("frozen", {}).get("mean")
        cells = [f"{r['probe'].get(k, {}).get(m, float('nan')):.2f}" for k, m in probes]
        lines.append("| " + " | ".join([str(v), "-" if frozen is None else f"{frozen:.4f}",
                                         pct(s.get("headroom")), pct(s.get("gain")), share,
                                         *cells]) + " |")
    return "\n".join(lines)


def main() -> int:
    import claims
    import probe_adapt

    ap = claims.input_args(argparse.ArgumentParser())
    ap.set_defaults(work=str(ROOT / "out" / "redesign"), data_seeds=[0], design="v1")
    ap.add_argument("--knob", required=True,
                    help="a config key, e.g. synthetic.caption_mention_prob")
    ap.add_argument("--values", nargs="+", required=True)
    ap.add_argument("--inits", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--model", default="vbpr")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="frozen and oracle-unit alone are stage-1 runs of seconds each")
    ap.add_argument("--methods", nargs="*", default=["frozen", "prompt"],
                    choices=list(probe_adapt.LRS), help="the probe's; none: no probe")
    ap.add_argument("--probe-epochs", type=int, default=15)
    ap.add_argument("--inputs", default=None,
                    help="a knob of the runs only: the folder whose data<d>/inputs every value "
                         "shares, e.g. out/claims-v2 (default: WORK/inputs)")
    ap.add_argument("overrides", nargs="*", help="key=value for every value's inputs and runs")
    args = claims.resolve_inputs(ap.parse_args())
    if args.inputs and not args.knob.startswith(RUN_KEYS):
        ap.error(f"--inputs shares one set of inputs, so the knob must be one of the runs "
                 f"({', '.join(k + '*' for k in RUN_KEYS)}), not {args.knob}")
    # a knob of the runs: every value on one set of inputs
    inputs = Path(args.inputs or Path(args.work) / "inputs") \
        if args.knob.startswith(RUN_KEYS) else None
    import torch
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows: dict = {}
    for value in args.values:
        work = Path(args.work) / f"{args.knob}={value}"
        valid: dict = {a: {} for a in args.arms}
        probe: dict = {}
        for d in args.data_seeds:
            # prepare applies the overrides, knob included, to inputs it finds already built
            base = claims.prepare(inputs or work, d, args.items, args.users,
                                  [*args.overrides, f"{args.knob}={value}"])
            for arm in args.arms:
                for seed in args.inits:
                    m = claims.run_one(base, work, d, args.model, seed, arm)
                    valid[arm][(d, seed)] = m["valid"][METRIC]
            probes = probe_adapt.probe_seed(base, work, d, args.methods, args.probe_epochs) \
                if args.methods else {}
            for key, ms in probes.items():
                for method, run in ms.items():
                    probe.setdefault(key, {}).setdefault(method, []).append(run["valid"])
        rows[value] = {"valid": summarise(valid),
                       "runs": {a: {f"{d}/{s}": v for (d, s), v in r.items()}
                                for a, r in valid.items()},
                       "probe": {k: {m: float(np.mean(v)) for m, v in ms.items()}
                                 for k, ms in probe.items()}}
    result = {"knob": args.knob, "values": args.values, **claims.inputs_record(args),
              "inits": args.inits, "model": args.model, "split": "valid",
              "rows": rows, "markdown": markdown(args.knob, rows),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, "redesign", result)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage-1 figures: epoch time, evaluation time and peak memory of every base recommender, on
Amazon Baby (interactions of ../shared/data/amazon-baby with random 512-d image and 512-d text
features, the shape of CLIP ViT-B/32 features, since the set ships no images) and on the
synthetic benchmark (``out/demo`` if ``make demo`` ran, else fresh synthetic interactions with
random 128-d features); and (unless ``--skip-quality``) full runs of ``pop`` and ``bpr`` on Baby
with early stopping, bpr's reg_weight chosen on valid from a small grid (test reported for the
chosen one only), and vbpr's reg_weight on the synthetic set (valid only). Also bpr on Baby on
1 rank (ZeRO-0, ZeRO-1) and 2 torchrun ranks (ZeRO-1, ZeRO-2): same valid metric, and the cost
of ZeRO and of data parallelism on one 2-core machine (peak RSS is per rank).

    .venv/bin/python bench/stage1.py [--epochs 3] [--skip-quality] [--models bpr,vbpr,freedom,bm3]

Every run is a fresh ``python -m ptmrec_dist stage1`` process; figures come from its
metrics.json (epoch_s_mean, eval_s_mean, peak_rss_mb). Prints JSON, writes OUT/stage1.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import write_result  # noqa: E402
from ptmrec_dist.dist import free_port  # noqa: E402

BABY = ROOT.parent / "shared" / "data" / "amazon-baby" / "baby.inter"
DEMO = ROOT / "out" / "demo"


def stage1(out: Path, data: str, model: str, features: str | None, *overrides: str,
           ranks: int = 1) -> dict:
    launch = [sys.executable, "-m", "ptmrec_dist"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_port", str(free_port()), "-m", "ptmrec_dist"]
    cmd = [*launch, "stage1", "--out", str(out), "--data", data,
           "--model", model, *(["--features", features] if features else []), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def random_features(folder: Path, n_items: int, dims: tuple[int, int]) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "image.npy", rng.standard_normal((n_items, dims[0]), dtype=np.float32))
    np.save(folder / "text.npy", rng.standard_normal((n_items, dims[1]), dtype=np.float32))
    return str(folder)


def synthetic(tmp: Path) -> tuple[str, str, str]:
    if (DEMO / "features" / "image.npy").is_file():
        return str(DEMO / "data"), str(DEMO / "features"), "out/demo (extracted features)"
    from ptmrec_dist.config import SyntheticConfig
    from ptmrec_dist.data.synthetic import generate
    cfg = SyntheticConfig(n_items=3000, n_users=3000)
    generate(cfg, tmp / "synthetic", split_seed=2026)
    return (str(tmp / "synthetic"), random_features(tmp / "synth-feats", 3000, (128, 128)),
            "generated 3000 x 3000 (random 128-d features)")


def speed(tmp: Path, data: str, features: str, models: list[str], epochs: int,
          extra: list[str]) -> dict:
    out = {}
    for model in models:
        m = stage1(tmp / f"speed-{Path(data).stem}-{model}", data, model, features,
                   f"stage1.epochs={epochs}", "stage1.patience=1000", *extra)
        out[model] = {k: m[k] for k in ("epoch_s_mean", "eval_s_mean", "peak_rss_mb",
                                        "trainable_params", "n_users", "n_items")}
        print(model, json.dumps(out[model]), flush=True)
    return out


def ranks(tmp: Path, epochs: int) -> dict:
    """bpr on Baby on 1 and 2 ranks (torchrun, gloo; the 2 ranks share this machine's cores)."""
    out = {}
    for n, zero in ((1, "zero0"), (1, "zero1"), (2, "zero1"), (2, "zero2")):
        m = stage1(tmp / f"ranks-{n}-{zero}", str(BABY), "bpr", None, f"stage1.epochs={epochs}",
                   f"stage1.ds_config={zero}", "stage1.patience=1000", ranks=n)
        out[f"{n}x{zero}"] = {k: m[k] for k in ("epoch_s_mean", "eval_s_mean", "peak_rss_mb")}
        out[f"{n}x{zero}"]["valid_recall@20"] = round(m["valid"]["recall@20"], 6)
        print("ranks", n, zero, json.dumps(out[f"{n}x{zero}"]), flush=True)
    return out


def quality(tmp: Path) -> dict:
    res = {"pop": stage1(tmp / "q-pop", str(BABY), "pop", None)}
    grid = {}
    for reg in ("1e-5", "1e-3", "1e-2", "1e-1", "1.0"):
        grid[reg] = stage1(tmp / f"q-bpr-{reg}", str(BABY), "bpr", None,
                           f"recommender.bpr.reg_weight={reg}", "stage1.patience=10")
        print("bpr reg", reg, grid[reg]["valid"]["recall@20"], flush=True)
    best = max(grid, key=lambda r: grid[r]["valid"]["recall@20"])   # valid only
    res["bpr"] = {**grid[best], "reg_weight": best,
                  "grid_valid_recall@20": {r: grid[r]["valid"]["recall@20"] for r in grid}}
    keep = ("recall@10", "recall@20", "ndcg@20", "recall@50")
    return {name: {"best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                   "valid": {k: round(r["valid"][k], 4) for k in keep},
                   "test": {k: round(r["test"][k], 4) for k in keep},
                   **({"reg_weight": r["reg_weight"],
                       "grid_valid_recall@20": r["grid_valid_recall@20"]}
                      if name == "bpr" else {})}
            for name, r in res.items()}


def vbpr_reg(tmp: Path, data: str, features: str) -> dict:
    """vbpr's reg_weight on the synthetic set (the demo's stage-1 settings), valid only."""
    out = {}
    for reg in ("1e-5", "1e-2", "1e-1"):
        m = stage1(tmp / f"vbpr-reg-{reg}", data, "vbpr", features,
                   f"recommender.vbpr.reg_weight={reg}", "stage1.batch_size=512",
                   "stage1.lr=0.005")
        out[reg] = {"best_epoch": m["best_epoch"],
                    "valid_recall@20": round(m["valid"]["recall@20"], 4)}
        print("vbpr reg", reg, json.dumps(out[reg]), flush=True)
    return out



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", default="bpr,vbpr,freedom,bm3")
    ap.add_argument("--skip-quality", action="store_true", help="skip the full pop vs bpr runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    models = args.models.split(",")
    result: dict = {"epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        feats = random_features(tmp / "baby-feats", 7050, (512, 512))
        result["baby"] = speed(tmp, str(BABY), feats, models, args.epochs, [])
        data, sfeats, what = synthetic(tmp)
        result["synthetic_source"] = what
        result["synthetic"] = speed(tmp, data, sfeats, models, args.epochs,
                                    ["stage1.batch_size=512"])
        result["baby_bpr_ranks"] = ranks(tmp, args.epochs)
        if not args.skip_quality:
            result["quality_baby"] = quality(tmp)
            result["vbpr_reg_synthetic"] = vbpr_reg(tmp, data, sfeats)
    print(json.dumps(result, indent=2))
    write_result(args.out, "stage1", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

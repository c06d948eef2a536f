"""Data-layer figures: synthetic generation, interaction parsing, sharding, shard reading.

    .venv/bin/python bench/data.py [--items 5000 --users 5000] [--out bench/results]

Prints one JSON object and writes it to OUT/data.json. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import peak_rss_mb, timed, write_result  # noqa: E402
from ptmrec_dist.config import DataConfig, SyntheticConfig  # noqa: E402
from ptmrec_dist.data.interactions import load_interactions  # noqa: E402
from ptmrec_dist.data.readers import ExactlyOnceItems, StreamingItems, collate_items  # noqa: E402
from ptmrec_dist.data.shards import write_shards  # noqa: E402
from ptmrec_dist.data.synthetic import generate  # noqa: E402

BABY = ROOT.parent / "shared" / "data" / "amazon-baby"


def read_all(ds, workers: int) -> int:
    from torch.utils.data import DataLoader
    loader = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate_items)
    return sum(len(b["index"]) for b in loader)


def bench_parse(tmp: Path, rows: int) -> dict:
    rng = np.random.default_rng(0)
    users = rng.integers(0, rows // 10, rows)
    items = rng.integers(0, 100_000, rows)
    path = tmp / "big.inter"
    with open(path, "w") as f:
        f.write("userID\titemID\n")
        np.savetxt(f, np.stack([users, items], 1), fmt="%d", delimiter="\t")
    inter, secs = timed(load_interactions, path, DataConfig(split="random"), lambda m: None)
    return {"rows": rows, "seconds": round(secs, 2), "rows_per_s": round(rows / secs),
            "after_dedup": len(inter.users)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--parse-rows", type=int, default=2_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    res: dict = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = SyntheticConfig(n_items=args.items, n_users=args.users, seed=0, image_size=64)
        summary, secs = timed(generate, cfg, tmp / "data")
        res["synthetic"] = {"items": args.items, "users": args.users,
                            "interactions": summary["n_interactions"], "seconds": round(secs, 2)}

        if (BABY / "baby.inter").is_file():
            _, secs = timed(load_interactions, BABY, None, lambda m: None)
            res["amazon_baby_load_seconds"] = round(secs, 2)
        res["parse"] = bench_parse(tmp, args.parse_rows)

        for workers in (1, 2):
            manifest, secs = timed(write_shards, tmp / "data", tmp / f"shards{workers}",
                                   shard_size=500, image_size=0, workers=workers,
                                   log=lambda m: None)
            mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
            res[f"shard_workers{workers}"] = {"seconds": round(secs, 2), "MB": round(mb, 1),
                                              "items_per_s": round(manifest["n_written"] / secs)}
        shards = tmp / "shards2"
        for workers in (0, 2):
            ds = ExactlyOnceItems(shards, num_workers=workers, decode="pil")
            n, secs = timed(read_all, ds, workers)
            res[f"read_exactly_once_workers{workers}"] = {"items": n, "seconds": round(secs, 2),
                                                         "items_per_s": round(n / secs)}
            ds = StreamingItems(shards, num_workers=workers, decode="pil", shuffle_buffer=256)
            n, secs = timed(read_all, ds, workers)
            res[f"read_streaming_workers{workers}"] = {"items": n, "seconds": round(secs, 2),
                                                      "items_per_s": round(n / secs)}
    res["peak_rss_MB"] = round(peak_rss_mb())
    write_result(args.out, "data", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

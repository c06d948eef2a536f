"""The GPU machine's figures (issue 21): one prepared script for a ViT-L/14-shaped CLIP in bf16,
under about five minutes on one H100/H200; results in bench/README.md.

    .venv/bin/python bench/gpu.py [--device cuda] [--preset vit-l14] [--items 4096]
        [--out bench/results] [--work /tmp/ptmrec-gpu] [--parts matmul,tower,extract,stage2,nccl]
    .venv/bin/python bench/gpu.py --device cpu --preset tiny --items 64   # the same flow here

Parts, each in a fresh process (its own peak memory; a failed part is a row saying why, the
others still run):

* ``matmul``: the measured dense matmul rate, bf16 on a GPU (fp32 on a CPU), square 8192
  (2048 on a CPU), median of 10 after warm-up: the ceiling the others are read against.
* ``tower``: the image tower alone as the product loads it (``load_backbone``,
  ``backbone.dtype=bf16``, SDPA), batches of 256 random images (8 on a CPU) without gradients:
  images/s, and its FLOPs (``clip.shapes.image_tower_flops``) as a share of the matmul rate.
* ``extract``: ``ptmrec extract`` end to end on ``--items`` synthetic items at 224 px written
  straight into shards (``make-data --shards``): items/s from its ``meta.json`` (decode,
  preprocessing, both towers, writing), against the tower alone.
* ``stage2``: one training step of both towers (a contrastive loss, as ``bench/stage2_cost.py``)
  for ``prompt`` and ``full`` with activation checkpointing off and on: images/s and peak
  memory (``torch.cuda.max_memory_allocated``; VmHWM on a CPU), fp32 weights under bf16
  autocast (what DeepSpeed's bf16 mode computes in), fused AdamW, batch 64 (4 on a CPU).
* ``nccl``: ``torch.distributed`` with one rank (gloo on a CPU), an all-reduce of 256 MB:
  that the backend starts; with one rank the time is the call's overhead, not a link's
  bandwidth (that needs two GPUs).

Writes ``OUT/gpu.json``; the machine (device name, CUDA, torch) is in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARTS = ("matmul", "tower", "extract", "stage2", "nccl")


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mb(device: str) -> float:
    import torch

    from _util import peak_rss_mb
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return peak_rss_mb()


def part_matmul(args) -> dict:
    import torch
    n = 8192 if args.device == "cuda" else 2048
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    s = _median_time(lambda: a @ b, args.device, reps=10)
    return {"n": n, "dtype": str(dtype).split(".")[1], "seconds": s,
            "tflops": 2 * n ** 3 / s / 1e12}


def _backbone_cfg(args, model_dir: Path, *overrides: str):
    from ptmrec_dist.config import load_config
    dtype = "bf16" if args.device == "cuda" else "fp32"
    return load_config(None, [f"backbone.name_or_path={model_dir}", f"backbone.dtype={dtype}",
                              "backbone.attn_implementation=sdpa", *overrides])


def part_tower(args, model_dir: Path) -> dict:
    import torch

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.shapes import image_tower_flops
    cfg = _backbone_cfg(args, model_dir)
    backbone = load_backbone(cfg.backbone, device=args.device)
    batch = 256 if args.device == "cuda" else 8
    size = backbone.image_size
    px = torch.randn(batch, 3, size, size, device=args.device)
    with torch.no_grad():
        s = _median_time(lambda: backbone.encode_images(px), args.device, reps=5)
    c = backbone.clip.config
    flops = image_tower_flops(c.vision_config, c.projection_dim)
    return {"batch": batch, "dtype": cfg.backbone.dtype, "images_per_s": batch / s,
            "gflop_per_image": flops / 1e9, "tflops": flops * batch / s / 1e12,
            "peak_mb": _peak_mb(args.device)}


def part_extract(args, model_dir: Path) -> dict:
    work = Path(args.work)
    shards, out = work / "shards", work / "features"
    py = [sys.executable, "-m", "ptmrec_dist"]
    dtype = "bf16" if args.device == "cuda" else "fp32"
    if not (shards / "manifest.json").is_file():
        subprocess.run([*py, "make-data", "synthetic", "--out", str(work / "data"),
                        "--items", str(args.items), "--users", "64", "--image-size", "224",
                        "--shards", str(shards), "--shard-size", "1024"],
                       check=True, capture_output=True, text=True)
    t = time.perf_counter()
    res = subprocess.run([*py, "extract", "--shards", str(shards), "--backbone", str(model_dir),
                          "--out", str(out), f"backbone.dtype={dtype}",
                          "extract.batch_size=256", f"extract.num_workers={args.workers}"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError((res.stderr.strip().splitlines() or ["exit"])[-1][:300])
    meta = json.loads((out / "meta.json").read_text())
    return {"items": args.items, "workers": args.workers, "dtype": dtype,
            "items_per_s": meta["rank0_items_per_s"], "process_s": wall,
            **{k: v for k, v in meta.items() if k.startswith("rank0_") and k.endswith("_s")}}


def part_stage2(args, model_dir: Path) -> list[dict]:
    import torch

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.methods import apply_method, param_counts
    from stage2_cost import contrastive_loss
    from _util import reset_peak
    rows = []
    batch = 64 if args.device == "cuda" else 4
    for method in ("prompt", "full"):
        for ckpt in ("false", "true"):
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak()                              # VmHWM from here
            cfg = _backbone_cfg(args, model_dir, f"peft.method={method}",
                                "peft.prompt_init=random",
                                f"stage2.activation_checkpointing={ckpt}")
            cfg.backbone.dtype = "fp32"                  # master weights; bf16 autocast below
            backbone = apply_method(load_backbone(cfg.backbone, device=args.device), cfg)
            backbone.train()
            params = [p for p in backbone.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda")
            g = torch.Generator().manual_seed(0)
            size, tc = backbone.image_size, backbone.clip.config.text_config
            px = torch.randn(batch, 3, size, size, generator=g).to(args.device)
            ids = torch.randint(0, tc.vocab_size - 2, (batch, 32), generator=g)
            ids[:, 0], ids[:, -1] = tc.bos_token_id, tc.eos_token_id
            ids, mask = ids.to(args.device), torch.ones_like(ids).to(args.device)

            def step():
                with torch.autocast(args.device, dtype=torch.bfloat16,
                                    enabled=args.device == "cuda"):
                    img, txt = backbone(px, ids, mask)
                    loss = contrastive_loss(img.float(), txt.float())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            s = _median_time(step, args.device, reps=5)
            rows.append({"method": method, "checkpointing": ckpt == "true", "batch": batch,
                         "images_per_s": batch / s, "step_s": s,
                         "peak_mb": _peak_mb(args.device),
                         "trainable": param_counts(backbone)["trainable"]})
            del backbone, opt, params
    full = {r["checkpointing"]: r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full[False]
        r["peak_vs_full"] = r["peak_mb"] / base["peak_mb"]
        r["time_vs_full"] = r["step_s"] / base["step_s"]
    return rows


def part_nccl(args) -> dict:
    import torch
    import torch.distributed as tdist
    backend = "nccl" if args.device == "cuda" else "gloo"
    tdist.init_process_group(backend, init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        x = torch.ones(64 * 2 ** 20, device=args.device)          # 256 MB of fp32
        s = _median_time(lambda: tdist.all_reduce(x), args.device, reps=10)
        return {"backend": backend, "world_size": 1, "mb": 256, "seconds": s,
                "algbw_gb_s": 0.25 / s}
    finally:
        tdist.destroy_process_group()


def machine(device: str) -> dict:
    import torch
    out = {"device": device, "torch": torch.__version__}
    if device == "cuda" and torch.cuda.is_available():
        out.update(name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30,
                                    1))
    return out


def child(args) -> dict:
    import torch
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_dir = Path(args.work) / f"{args.preset}-random"
    fn = {"matmul": lambda: part_matmul(args), "tower": lambda: part_tower(args, model_dir),
          "extract": lambda: part_extract(args, model_dir),
          "stage2": lambda: part_stage2(args, model_dir), "nccl": lambda: part_nccl(args)}
    return {"part": args.child, "machine": machine(args.device), "result": fn[args.child]()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="vit-l14", help="bench/stage2_cost.py's presets")
    ap.add_argument("--items", type=int, default=4096, help="items for the extract part")
    ap.add_argument("--workers", type=int, default=8, help="extract.num_workers")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--work", default="/tmp/ptmrec-gpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per part")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    from stage2_cost import save_random_clip

    from _util import write_result
    if {"tower", "extract", "stage2"} & set(parts):
        save_random_clip(args.preset, Path(args.work) / f"{args.preset}-random")
    rows = []
    for part in parts:
        cmd = [sys.executable, __file__, "--child", part, "--device", args.device, "--preset",
               args.preset, "--items", str(args.items), "--workers", str(args.workers),
               "--work", args.work]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = res.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if res.returncode == 0 and lines else {
                "part": part, "status": "failed: " + ((res.stderr.strip().splitlines()
                                                       or [f"exit {res.returncode}"])[-1])[:300]}
        except subprocess.TimeoutExpired:
            row = {"part": part, "status": f"failed: timeout after {args.timeout} s"}
        row.setdefault("status", "ok")
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["part"]: r.get("result") for r in rows if r["status"] == "ok"}
    if by.get("matmul") and by.get("tower"):
        by["tower"]["share_of_matmul"] = by["tower"]["tflops"] / by["matmul"]["tflops"]
    if by.get("tower") and by.get("extract"):
        by["extract"]["share_of_tower"] = (by["extract"]["items_per_s"]
                                           / by["tower"]["images_per_s"])
    write_result(args.out, "gpu", {"device": args.device, "preset": args.preset, "rows": rows})
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

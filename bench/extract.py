"""Extraction figures: `ptmrec extract` against a naive per-item loop, and the achieved FLOP/s
of the image tower alone and of the whole command (its image FLOPs per item times its items/s,
a lower bound: the text tower's FLOPs are not counted) against this machine's measured fp32
GEMM rate; and a profile of the command (``demo_profile``, ``vit_b16_profile``): for several
data-loader worker and torch thread counts, items/s and the shares of the time rank 0 waits for
the loader and spends in the towers (``meta.json``'s ``rank0_loader_wait_s``/``rank0_encode_s``).

    .venv/bin/python bench/extract.py [--items 512] [--vitb-items 48] [--out bench/results]

Models have random weights of real shapes: the demo backbone's (DemoBackboneConfig defaults) and
OpenAI's ViT-B/16. Prints one JSON object and writes OUT/extract.json. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ptmrec_dist.clip.demo_backbone import clip_config as demo_clip_config  # noqa: E402
from ptmrec_dist.clip.extract import run_extract  # noqa: E402
from ptmrec_dist.clip.images import build_image_processor  # noqa: E402
from ptmrec_dist.clip.shapes import clip_config, image_tower_flops  # noqa: E402
from ptmrec_dist.clip.tokenizer import build_tokenizer  # noqa: E402
from ptmrec_dist.config import Config, DemoBackboneConfig, SyntheticConfig  # noqa: E402
from ptmrec_dist.data.shards import write_shards  # noqa: E402
from ptmrec_dist.data.synthetic import generate  # noqa: E402
from ptmrec_dist.dist import DistEnv  # noqa: E402
from _util import write_result  # noqa: E402


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def tower_rate(model, image_size: int, batch: int, batches: int) -> float:
    """Images per second through get_image_features (fp32, inference mode, SDPA)."""
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.inference_mode():
        model.get_image_features(pixel_values=x)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.get_image_features(pixel_values=x)
    return batch * batches / (time.perf_counter() - t0)


def save_model(model, tokenizer, image_size: int, out: Path) -> Path:
    from transformers import CLIPProcessor
    model.save_pretrained(out)
    CLIPProcessor(image_processor=build_image_processor(image_size), tokenizer=tokenizer) \
        .save_pretrained(out)
    return out


def naive_rate(model_dir: Path, data: Path, n: int) -> float:
    """One item at a time: PIL open, processor, tokenizer, both towers."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(model_dir)
    items = [json.loads(x) for x in (data / "items.jsonl").read_text().splitlines()][:n]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for it in items:
            img = Image.open(data / it["image"]).convert("RGB")
            pv = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
            enc = proc.tokenizer([f"{it['title']}. {it['text']}"], return_tensors="pt",
                                 truncation=True, max_length=model.config.text_config.max_position_embeddings)
            model.get_image_features(pixel_values=pv)
            model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return n / (time.perf_counter() - t0)


def pipeline_meta(model_dir: Path, shards: Path, out: Path, batch: int, workers: int) -> dict:
    cfg = Config()
    cfg.backbone.name_or_path = str(model_dir)
    cfg.extract.batch_size, cfg.extract.num_workers = batch, workers
    return run_extract(cfg, shards, out, DistEnv(), log=lambda m: None)


def pipeline_rate(model_dir: Path, shards: Path, out: Path, batch: int, workers: int) -> float:
    return pipeline_meta(model_dir, shards, out, batch, workers)["rank0_items_per_s"]


def profile(model_dir: Path, shards: Path, tmp: Path, batch: int, grid) -> list[dict]:
    """Where ``ptmrec extract``'s time goes: for each (loader workers, torch threads) of
    ``grid``, items/s and the shares of rank 0's time spent waiting for the data loader
    (reading, decoding, preprocessing, tokenising not hidden behind the towers) and in the
    towers. Each run extracts afresh into its own folder."""
    threads0 = torch.get_num_threads()
    rows = []
    for workers, threads in grid:
        torch.set_num_threads(threads)
        try:
            meta = pipeline_meta(model_dir, shards, tmp / f"prof-{model_dir.name}-{workers}-"
                                 f"{threads}", batch, workers)
        finally:
            torch.set_num_threads(threads0)
        total = meta["rank0_items"] / meta["rank0_items_per_s"]
        rows.append({"workers": workers, "torch_threads": threads,
                     "items_per_s": meta["rank0_items_per_s"],
                     "loader_wait_share": round(meta["rank0_loader_wait_s"] / total, 3),
                     "encode_share": round(meta["rank0_encode_s"] / total, 3)})
        print("profile", model_dir.name, json.dumps(rows[-1]), flush=True)
    return rows


def compare(name, model, tokenizer, image_size, tmp, data, shards, n_naive, batch) -> dict:
    model_dir = save_model(model, tokenizer, image_size, tmp / f"model-{name}")
    naive = naive_rate(model_dir, data, n_naive)
    fast = pipeline_rate(model_dir, shards, tmp / f"feat-{name}", batch, workers=2)
    return {"naive_items_per_s": round(naive, 2), "extract_items_per_s": round(fast, 2),
            "speedup": round(fast / naive, 2), "naive_items": n_naive}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=512, help="catalog size for the demo model")
    ap.add_argument("--vitb-items", type=int, default=48, help="catalog size for ViT-B/16")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import CLIPModel

    res: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    res["gemm_fp32_gflops"] = round(gemm_gflops(), 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the demo backbone's shape, 64 px
        dcfg = DemoBackboneConfig()
        data = tmp / "data"
        generate(SyntheticConfig(n_items=args.items, n_users=50, image_size=dcfg.image_size), data)
        shards = tmp / "shards"
        write_shards(data, shards, shard_size=128, log=lambda m: None)
        texts = [json.loads(x)["text"] for x in (data / "items.jsonl").read_text().splitlines()]
        tok = build_tokenizer(texts, max_len=dcfg.max_text_len)
        demo = CLIPModel(demo_clip_config(dcfg, tok)).eval()
        res["demo_shape"] = compare("demo", demo, tok, dcfg.image_size, tmp, data, shards,
                                    min(args.items, 64), batch=64)
        res["demo_profile"] = profile(tmp / "model-demo", shards, tmp, 64,
                                      [(0, 2), (1, 1), (1, 2), (2, 1), (2, 2)])

        # ViT-B/16 at 224 px: pipeline vs naive on a small catalog, then the tower's FLOP/s
        data_b = tmp / "data224"
        generate(SyntheticConfig(n_items=args.vitb_items, n_users=20, image_size=224), data_b)
        shards_b = tmp / "shards224"
        write_shards(data_b, shards_b, shard_size=16, log=lambda m: None)
        vit = CLIPModel(clip_config("vit-b16", tokenizer=tok)).eval()
        res["vit_b16"] = compare("vitb16", vit, tok, 224, tmp, data_b, shards_b,
                                 min(args.vitb_items, 16), batch=16)
        res["vit_b16_profile"] = profile(tmp / "model-vitb16", shards_b, tmp, 16,
                                         [(0, 2), (2, 2)])
        flops = image_tower_flops(vit.config.vision_config, vit.config.projection_dim)
        rate = tower_rate(vit, 224, batch=16, batches=3)
        res["vit_b16_image_tower"] = {
            "gflops_per_image": round(flops / 1e9, 2), "images_per_s": round(rate, 2),
            "achieved_gflops": round(rate * flops / 1e9, 1),
            "fraction_of_gemm": round(rate * flops / 1e9 / res["gemm_fp32_gflops"], 3)}
        # end to end (`ptmrec extract`: shards read, decoded, both towers): the image tower's
        # FLOPs per item over the whole command's rate, a lower bound (text FLOPs left out)
        e2e = res["vit_b16"]["extract_items_per_s"] * flops / 1e9
        res["vit_b16"]["extract_image_gflops"] = round(e2e, 1)
        res["vit_b16"]["extract_fraction_of_gemm_lower_bound"] = round(
            e2e / res["gemm_fp32_gflops"], 3)
    write_result(args.out, "extract", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

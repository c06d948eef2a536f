"""The demo backbone: a small CLIP pretrained here on the synthetic catalog's generic captions.

Real CLIP weights cannot be downloaded offline, so ``ptmrec make-backbone`` builds a stand-in:
a byte-level BPE tokenizer trained on the catalog's captions and item texts
(:mod:`ptmrec_dist.clip.tokenizer`), a small HF :class:`~transformers.CLIPModel`, contrastive
pretraining on (image, generic caption) pairs (images: :mod:`ptmrec_dist.clip.images`), and a
held-out evaluation (:mod:`ptmrec_dist.clip.demo_eval`). The output folder is a regular HF
checkpoint: ``CLIPModel``, ``CLIPProcessor``, ``AutoProcessor`` and ``AutoTokenizer`` load it
with ``from_pretrained`` offline, without ``trust_remote_code``.

The captions name only category and colour, so the features carry the domain gap on purpose:
they separate category and colour and know next to nothing of pattern or material (see
docs/backbone.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptmrec_dist.clip.demo_eval import evaluate, read_truth
from ptmrec_dist.clip.images import (build_image_processor, load_images, normalisation_table,
                                     normalise_images)
from ptmrec_dist.clip.tokenizer import build_tokenizer
from ptmrec_dist.config import DemoBackboneConfig
from ptmrec_dist.data.catalog import CatalogItem, read_catalog
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.io import append_jsonl, atomic_write_json, iter_jsonl
from ptmrec_dist.logs import get_logger, progress

_log = get_logger(__name__)

WEIGHT_DECAY = 0.1            # AdamW, on matrices only (not biases, norms, logit_scale)
WARMUP_FRACTION = 0.1         # linear warm-up over this share of the steps, then cosine to 0
GRAD_CLIP = 1.0
MAX_LOGIT_SCALE = math.log(100.0)   # CLIP clamps the learnable temperature at 100
CAPTIONS_FILE = "captions.jsonl"
METRICS_FILE, LOG_FILE = "pretrain_metrics.json", "log.jsonl"


# --------------------------------------------------------------------------- config
def _check(cfg: DemoBackboneConfig) -> None:
    """The ``demo_backbone.*`` checks (Config.validate does some; this API may be called
    directly)."""
    checks = [
        ("heads", lambda: cfg.heads >= 1, "must be >= 1"),
        ("width", lambda: cfg.width >= 1 and cfg.width % cfg.heads == 0,
         "must be a positive multiple of demo_backbone.heads"),
        ("layers", lambda: cfg.layers >= 1, "must be >= 1"),
        ("patch_size", lambda: cfg.patch_size >= 1, "must be >= 1"),
        ("image_size", lambda: cfg.image_size % cfg.patch_size == 0,
         "must be a multiple of demo_backbone.patch_size"),
        ("projection_dim", lambda: cfg.projection_dim >= 1, "must be >= 1"),
        ("max_text_len", lambda: cfg.max_text_len >= 3, "must be >= 3"),
        ("epochs", lambda: cfg.epochs >= 1, "must be >= 1"),
        ("batch_size", lambda: cfg.batch_size >= 2, "must be >= 2 (contrastive batches)"),
        ("lr", lambda: cfg.lr > 0, "must be > 0"),
        ("holdout", lambda: 0 < cfg.holdout < 1, "must be in (0, 1)"),
    ]
    for key, ok, what in checks:
        if not ok():
            raise ConfigError(f"config key 'demo_backbone.{key}' {what} "
                              f"(got {getattr(cfg, key)!r})")


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class DemoData:
    """The catalog as make-backbone reads it: items, one caption each, truth.json (or None)."""

    items: list[CatalogItem]
    captions: list[str]
    truth: dict | None


@dataclasses.dataclass
class Pairs:
    """The (image, caption) pairs in memory: uint8 images, tokenised captions, and the
    processor's normalisation table."""

    images: torch.Tensor            # uint8 (N, 3, S, S)
    input_ids: torch.Tensor         # (N, L), padded to the longest caption
    attention_mask: torch.Tensor
    table: torch.Tensor             # (3, 256), see images.normalisation_table


def _read_captions(data_dir: Path) -> dict[str, str]:
    path = data_dir / CAPTIONS_FILE
    if not path.is_file():
        raise InputError(path, "captions file not found (make-backbone pretrains on the generic "
                               "captions of a synthetic catalog: ptmrec make-data synthetic)")
    out: dict[str, str] = {}
    for line_no, obj in iter_jsonl(path):
        if "item_id" not in obj or not isinstance(obj.get("caption"), str) \
                or not obj["caption"].strip():
            raise InputError(path, "expected {\"item_id\": ..., \"caption\": \"...\"}",
                             line=line_no)
        out[str(obj["item_id"])] = obj["caption"]
    return out


def read_data(data_dir: Path, holdout: float) -> DemoData:
    """items.jsonl, captions.jsonl and truth.json of ``data_dir``; InputError when an item has
    no caption or no image, or there are too few items for ``holdout``."""
    items = read_catalog(data_dir)
    captions_by_id = _read_captions(data_dir)
    missing = [it for it in items if it.item_id not in captions_by_id]
    if missing:
        raise InputError(data_dir / CAPTIONS_FILE, f"no caption for item_id "
                                                   f"{missing[0].item_id!r} ({len(missing)} items "
                                                   "without one)")
    captions = [captions_by_id[it.item_id] for it in items]
    truth = read_truth(data_dir, [it.item_id for it in items])
    n = len(items)
    n_hold = round(holdout * n)
    if n_hold < 2 or n - n_hold < 2:
        raise InputError(data_dir, f"{n} items are too few for demo_backbone.holdout="
                                   f"{holdout} (need >= 2 held out and >= 2 to train on)")
    no_image = next((it for it in items if not it.image), None)
    if no_image is not None:
        raise InputError(data_dir / "items.jsonl", "missing", line=no_image.line, field="image")
    return DemoData(items, captions, truth)


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, train) item positions, each sorted: a seeded permutation holds out
    ``round(holdout * n)``."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_hold = round(holdout * n)
    return np.sort(perm[:n_hold]), np.sort(perm[n_hold:])


def build_processor(data: DemoData, cfg: DemoBackboneConfig):
    """A ``CLIPProcessor``: the tokenizer trained on the captions and item texts, and CLIP's
    image processor at ``cfg.image_size``."""
    from transformers import CLIPProcessor

    corpus = data.captions + [it.encoder_text for it in data.items]
    tokenizer = build_tokenizer(corpus, max_len=cfg.max_text_len)
    return CLIPProcessor(image_processor=build_image_processor(cfg.image_size),
                         tokenizer=tokenizer)


def load_pairs(data: DemoData, data_dir: Path, processor, cfg: DemoBackboneConfig) -> Pairs:
    """All images (uint8) and tokenised captions, once."""
    images = load_images([data_dir / it.image for it in data.items], processor.image_processor,
                         cfg.image_size)
    tok = processor.tokenizer(data.captions, padding=True, truncation=True,
                              max_length=cfg.max_text_len, return_tensors="pt")
    return Pairs(images, tok["input_ids"], tok["attention_mask"],
                 normalisation_table(processor.image_processor))


# --------------------------------------------------------------------------- model
def clip_config(cfg: DemoBackboneConfig, tokenizer):
    from transformers import CLIPConfig

    common = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  projection_dim=cfg.projection_dim)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_text_len,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(common, image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (as ``CLIPModel(return_loss=True)``)."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * text_embeds @ image_embeds.t()      # (text, image)
    target = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, round(WARMUP_FRACTION * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# --------------------------------------------------------------------------- training
def batching(n_train: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch): the last partial batch of an epoch is dropped."""
    bs = min(batch_size, n_train)
    return bs, max(1, n_train // bs)


def _train_step(model, opt, sched, pairs: Pairs, idx: torch.Tensor) -> float:
    """One contrastive step on the pairs ``idx``; returns the loss."""
    ids, mask = pairs.input_ids[idx], pairs.attention_mask[idx]
    width = int(mask.sum(1).max())                   # trim common padding
    img = model.get_image_features(
        pixel_values=normalise_images(pairs.images[idx], pairs.table)).pooler_output
    txt = model.get_text_features(input_ids=ids[:, :width],
                                  attention_mask=mask[:, :width]).pooler_output
    loss = clip_loss(img, txt, model.logit_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return loss.item()


def train(model, pairs: Pairs, train_idx: np.ndarray, cfg: DemoBackboneConfig, seed: int,
          log_path: Path, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """``cfg.epochs`` epochs of shuffled batches of ``cfg.batch_size`` pairs (the last partial
    batch dropped); one ``log_path`` line per epoch. Returns (epoch records, {"steps",
    "batch_size", "train_seconds"})."""
    t0 = time.perf_counter()
    train_t = torch.from_numpy(train_idx)
    bs, steps_per_epoch = batching(len(train_idx), cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
    epochs: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        model.train()
        order = train_t[torch.randperm(len(train_t), generator=gen)]
        steps = progress(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}",
                         unit="step", leave=False)
        losses = [_train_step(model, opt, sched, pairs, order[s * bs:(s + 1) * bs])
                  for s in steps]
        rec = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5),
               "lr": float(opt.param_groups[0]["lr"]),
               "logit_scale": round(model.logit_scale.exp().item(), 3),
               "seconds": round(time.perf_counter() - te, 2)}
        epochs.append(rec)
        append_jsonl(log_path, rec)
        log(f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.4f}, "
            f"logit scale {rec['logit_scale']:.1f}, {rec['seconds']:.1f} s")
    return epochs, {"steps": total, "batch_size": bs,
                    "train_seconds": round(time.perf_counter() - t0, 2)}


def evaluate_heldout(model, processor, pairs: Pairs, data: DemoData, hold: np.ndarray,
                     max_len: int) -> dict:
    """:func:`~ptmrec_dist.clip.demo_eval.evaluate` on the held-out items."""
    truth = None if data.truth is None else \
        {"vocab": data.truth["vocab"], "attrs": {a: v[hold] for a, v in
                                                 data.truth["attrs"].items()}}
    return evaluate(model, processor.tokenizer, pairs.images[torch.from_numpy(hold)],
                    [data.captions[i] for i in hold], pairs.table, truth, max_len)


# --------------------------------------------------------------------------- output
def save_checkpoint(model, processor, out: Path) -> list[str]:
    """``save_pretrained`` of the model (eval mode, safetensors) and the processor into a
    temporary folder inside ``out``, then renamed into place file by file; the file names."""
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, out / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- driver
def build_demo_backbone(data_dir: str | Path, out_dir: str | Path, cfg: DemoBackboneConfig,
                        seed: int = 0, log: Callable[[str], None] | None = None,
                        return_model: bool = False) -> dict:
    """Pretrain a small CLIP on the catalog's (image, generic caption) pairs; save it to
    ``out_dir`` as an HF checkpoint with its processor; returns a summary dict.

    ``out_dir`` gets the model (``config.json``, ``model.safetensors``), the processor
    (``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ...),
    ``log.jsonl`` (one line per epoch) and, written last, ``pretrain_metrics.json``.
    Deterministic for a seed (and thread count); the caller's torch RNG state is untouched.
    Returns ``{"out_dir", "n_params", "epochs", "seconds", "final_loss", "heldout"}``, plus the
    in-memory ``"model"`` (eval mode) and ``"processor"`` if ``return_model``. Messages go to
    ``log`` (default: this module's logger).
    """
    from transformers import CLIPModel

    log = log or _log.info
    t0 = time.perf_counter()
    _check(cfg)
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)        # written last: present = complete
    (out / LOG_FILE).unlink(missing_ok=True)

    data = read_data(data_dir, cfg.holdout)
    processor = build_processor(data, cfg)
    log(f"tokenizer: {len(processor.tokenizer)} tokens; loading {len(data.items)} images")
    pairs = load_pairs(data, data_dir, processor, cfg)
    hold, train_idx = split(len(data.items), cfg.holdout, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(cfg, processor.tokenizer))
        n_params = int(sum(p.numel() for p in model.parameters()))
        bs, steps_per_epoch = batching(len(train_idx), cfg.batch_size)
        log(f"demo CLIP: {n_params / 1e6:.2f} M parameters; {len(train_idx)} train / "
            f"{len(hold)} held-out items; {cfg.epochs} epochs x {steps_per_epoch} steps of {bs}")
        epochs, run = train(model, pairs, train_idx, cfg, seed, out / LOG_FILE, log)
        heldout = evaluate_heldout(model, processor, pairs, data, hold, cfg.max_text_len)
    files = save_checkpoint(model, processor, out)
    seconds = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / METRICS_FILE, {
        "format": "ptmrec-demo-backbone/1",
        "data_dir": str(data_dir), "seed": seed, "config": dataclasses.asdict(cfg),
        "n_items": len(data.items), "n_train": len(train_idx), "n_heldout": len(hold),
        "n_params": n_params, "vocab_size": len(processor.tokenizer), **run,
        "seconds": seconds, "train_loss": [e["loss"] for e in epochs], "epochs": epochs,
        "heldout": heldout, "files": files})
    zs = heldout.get("zero_shot", {}).get("colour_category")
    if zs:
        log(f"held-out zero-shot colour+category accuracy {zs['accuracy']:.3f} "
            f"(chance {zs['chance']:.3f}); saved to {out}")
    summary = {"out_dir": str(out), "n_params": n_params, "epochs": cfg.epochs,
               "seconds": seconds, "final_loss": epochs[-1]["loss"],
               "heldout": heldout}
    if return_model:
        summary.update(model=model, processor=processor)
    return summary

"""The demo backbone's held-out evaluation: zero-shot classification against prompts built from
truth.json's vocabularies, and caption <-> image retrieval (docs/backbone.md, "Output files")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptmrec_dist.clip.images import normalise_images
from ptmrec_dist.errors import InputError

EVAL_BATCH = 256
TRUTH_FILE = "truth.json"
ZERO_SHOT_TEMPLATE = "a photo of {a} {colour} {category}"
GAP_TEMPLATE = "a photo of {a} {value} item"
GAP_ATTRIBUTES = ("pattern", "material", "shape")


def read_truth(data_dir: Path, item_ids: list[str]) -> dict | None:
    """Per-item attribute indices and vocabularies from truth.json (None if absent)."""
    path = data_dir / TRUTH_FILE
    if not path.is_file():
        return None
    truth = json.loads(path.read_text(encoding="utf-8"))
    attrs = truth.get("item_attributes", {})
    vocab = truth.get("vocab", {})
    if not all(i.isdecimal() for i in item_ids):
        raise InputError(path, "item ids must be the indices 0..N-1 to match truth.json")
    idx = np.array([int(i) for i in item_ids])
    out = {"vocab": vocab, "attrs": {}}
    for a, values in attrs.items():
        values = np.asarray(values, dtype=np.int64)
        if len(idx) and idx.max() >= len(values):
            raise InputError(path, f"item_attributes.{a} has {len(values)} items, fewer than "
                                   "items.jsonl")
        out["attrs"][a] = values[idx]
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@torch.no_grad()
def _encode_images(model, images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    out = [model.get_image_features(pixel_values=normalise_images(images[s:s + EVAL_BATCH],
                                                                  table)).pooler_output
           for s in range(0, len(images), EVAL_BATCH)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), EVAL_BATCH):
        tok = tokenizer(texts[s:s + EVAL_BATCH], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        out.append(model.get_text_features(input_ids=tok["input_ids"],
                                           attention_mask=tok["attention_mask"]).pooler_output)
    return F.normalize(torch.cat(out), dim=-1)


def _recall(sim: torch.Tensor, key: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Hit if any of the top-k retrieved has the query's key. sim: (queries, candidates)."""
    key_t = torch.from_numpy(key)
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"recall@{k}"] = round(float((key_t[top] == key_t[:, None]).any(1).float().mean()), 4)
    return out


def _zero_shot(model, tokenizer, img: torch.Tensor, truth: dict, max_len: int) -> dict:
    """Each image against the 64 "{colour} {category}" prompts, and against each gap
    attribute's "{value} item" prompts: accuracy and chance."""
    cats, cols = truth["vocab"]["category"], truth["vocab"]["colour"]
    cat, col = truth["attrs"]["category"], truth["attrs"]["colour"]
    prompts = [ZERO_SHOT_TEMPLATE.format(a=_article(c), colour=c, category=k)
               for c in cols for k in cats]
    pred = (img @ _encode_texts(model, tokenizer, prompts, max_len).t()).argmax(1).numpy()
    p_col, p_cat = pred // len(cats), pred % len(cats)
    zs = {"template": ZERO_SHOT_TEMPLATE,
          "colour_category": {"accuracy": float(np.mean((p_col == col) & (p_cat == cat))),
                              "chance": 1.0 / (len(cats) * len(cols))},
          "colour": {"accuracy": float(np.mean(p_col == col)), "chance": 1.0 / len(cols)},
          "category": {"accuracy": float(np.mean(p_cat == cat)), "chance": 1.0 / len(cats)}}
    for a in GAP_ATTRIBUTES:
        if a not in truth["attrs"] or a not in truth["vocab"]:
            continue
        names = truth["vocab"][a]
        prompts = [GAP_TEMPLATE.format(a=_article(v), value=v) for v in names]
        pred = (img @ _encode_texts(model, tokenizer, prompts, max_len).t()).argmax(1)
        zs[a] = {"template": GAP_TEMPLATE,
                 "accuracy": float(np.mean(pred.numpy() == truth["attrs"][a])),
                 "chance": 1.0 / len(names)}
    for v in zs.values():
        if isinstance(v, dict):
            v.update({k: round(x, 4) for k, x in v.items() if isinstance(x, float)})
    return zs


def evaluate(model, tokenizer, images: torch.Tensor, captions: list[str], table: torch.Tensor,
             truth: dict | None, max_len: int) -> dict:
    """Held-out metrics: zero-shot classification and caption <-> image retrieval."""
    model.eval()
    img = _encode_images(model, images, table)
    cap = _encode_texts(model, tokenizer, captions, max_len)
    out: dict = {"n": len(images)}
    if truth is not None and {"category", "colour"} <= set(truth["attrs"]):
        out["zero_shot"] = _zero_shot(model, tokenizer, img, truth, max_len)
        key = (truth["attrs"]["category"] * len(truth["vocab"]["colour"])
               + truth["attrs"]["colour"]).astype(np.int64)
        out["retrieval_key"] = "same (category, colour)"
    else:
        key = np.unique(np.asarray(captions), return_inverse=True)[1].astype(np.int64)
        out["retrieval_key"] = "same caption"
    sim = img @ cap.t()
    same = key[:, None] == key[None, :]
    out["retrieval"] = {"image_to_caption": _recall(sim, key), "caption_to_image":
                        _recall(sim.t().contiguous(), key),
                        "chance_recall@1": round(float(same.mean()), 4)}
    return out

"""The demo backbone: a small CLIP pretrained here on the synthetic catalog's generic captions.

Real CLIP weights cannot be downloaded offline, so ``ptmrec make-backbone`` builds a stand-in:
a byte-level BPE tokenizer trained on the catalog's captions and item texts, a small HF
:class:`~transformers.CLIPModel`, contrastive pretraining on (image, generic caption) pairs, and
a held-out evaluation. The output folder is a regular HF checkpoint: ``CLIPModel``,
``CLIPProcessor``, ``AutoProcessor`` and ``AutoTokenizer`` load it with ``from_pretrained``
offline, without ``trust_remote_code``.

The captions name only category and colour, so the features carry the domain gap on purpose:
they separate category and colour and know next to nothing of pattern or material (see
docs/backbone.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ptmrec_dist.clip.backbone import weights_hash as state_dict_hash  # noqa: F401
from ptmrec_dist.config import DemoBackboneConfig
from ptmrec_dist.data.catalog import read_catalog
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.io import append_jsonl, atomic_write_json, iter_jsonl

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_VOCAB = 2000              # tokenizer size cap (base 512 symbols + merges + 2 specials)
MIN_PAIR_COUNT = 2            # a merge needs a pair seen at least this often in the corpus
WEIGHT_DECAY = 0.1            # AdamW, on matrices only (not biases, norms, logit_scale)
WARMUP_FRACTION = 0.1         # linear warm-up over this share of the steps, then cosine to 0
GRAD_CLIP = 1.0
MAX_LOGIT_SCALE = math.log(100.0)   # CLIP clamps the learnable temperature at 100
EVAL_BATCH = 256
CAPTIONS_FILE, TRUTH_FILE = "captions.jsonl", "truth.json"
METRICS_FILE, LOG_FILE = "pretrain_metrics.json", "log.jsonl"
ZERO_SHOT_TEMPLATE = "a photo of {a} {colour} {category}"
GAP_TEMPLATE = "a photo of {a} {value} item"
GAP_ATTRIBUTES = ("pattern", "material", "shape")


# --------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the 256 base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _clip_backend():
    """A vocabulary-less CLIPTokenizer's backend: CLIP's normaliser and pre-tokeniser."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer().backend_tokenizer


def _words(texts: Iterable[str]) -> Counter:
    """Pre-tokens (byte-level strings) of ``texts`` exactly as CLIPTokenizer splits them."""
    backend = _clip_backend()
    counts: Counter = Counter()
    for text in texts:
        norm = backend.normalizer.normalize_str(text)
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm))
    return counts


def train_bpe(texts: Iterable[str], max_vocab: int = MAX_VOCAB,
              min_count: int = MIN_PAIR_COUNT) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE on ``texts``: (vocab, merges), deterministic.

    Vocab order as CLIP's: the 256 byte symbols, the same with ``</w>``, the merged symbols in
    merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (the two largest ids). Merges are
    learned greedily from word frequencies (the most frequent adjacent pair first; ties broken by
    the pair's text) until the vocab is full or no pair occurs ``min_count`` times.
    """
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + END_OF_WORD for b in base]
    words = {w: c for w, c in sorted(_words(texts).items())}
    seqs = {w: list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words}
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    while len(vocab_list) + 2 < max_vocab:
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_count:
            break
        merges.append((a, b))
        if a + b not in known:
            known.add(a + b)
            vocab_list.append(a + b)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(texts: Iterable[str], max_len: int, max_vocab: int = MAX_VOCAB):
    """A transformers ``CLIPTokenizer`` with a BPE vocabulary trained on ``texts``."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(texts, max_vocab=max_vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)


def normalise_text(text: str) -> str:
    """What ``decode(encode(text))`` gives: CLIP's normalisation (NFC, lower case), one space
    between pre-tokens (words, single digits, punctuation runs)."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    backend = _clip_backend()
    pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    return " ".join(bytes(inverse[c] for c in w).decode("utf-8", errors="replace")
                    for w, _ in pieces)


# --------------------------------------------------------------------------- images
def build_image_processor(image_size: int):
    """CLIP's image processor (PIL backend; resize shorter side, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def normalisation_table(image_processor) -> torch.Tensor:
    """(3, 256) float32: pixel_values of each uint8 value per channel, computed with the
    processor's own arithmetic (rescale in float64 then cast to float32, then
    ``(x - mean) / std`` in float32), so a lookup equals what the processor gives bit for bit."""
    v = np.arange(256, dtype=np.float64)
    x = (v * image_processor.rescale_factor).astype(np.float32) if image_processor.do_rescale \
        else v.astype(np.float32)
    if not image_processor.do_normalize:
        return torch.from_numpy(np.stack([x] * 3))
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    return torch.from_numpy(((x[None, :] - mean[:, None]) / std[:, None]).astype(np.float32))


def normalise_images(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 pixel_values, via :func:`normalisation_table`."""
    idx = images.long() + torch.arange(3).view(1, 3, 1, 1) * 256
    return table.reshape(-1)[idx]


def load_images(paths: list[Path], image_processor, size: int) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, size, size). Images that are not already RGB
    ``size`` x ``size`` go once through the processor's own RGB conversion (transparency onto
    white), resize and centre crop, so the result is what the processor would feed the model."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode == "RGB" and img.size == (size, size):
                    arr = np.asarray(img).transpose(2, 0, 1)
                else:
                    pv = image_processor(img, do_rescale=False, do_normalize=False,
                                         return_tensors="np")["pixel_values"][0]
                    arr = np.clip(np.rint(pv), 0, 255).astype(np.uint8)
        except FileNotFoundError:
            raise InputError(path, "image file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(path, f"undecodable image ({exc})") from None
        out[i] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


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


# --------------------------------------------------------------------------- data
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


def _read_truth(data_dir: Path, item_ids: list[str]) -> dict | None:
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


# --------------------------------------------------------------------------- evaluation
def _recall(sim: torch.Tensor, key: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Hit if any of the top-k retrieved has the query's key. sim: (queries, candidates)."""
    key_t = torch.from_numpy(key)
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"recall@{k}"] = round(float((key_t[top] == key_t[:, None]).any(1).float().mean()), 4)
    return out


def evaluate(model, tokenizer, images: torch.Tensor, captions: list[str], table: torch.Tensor,
             truth: dict | None, max_len: int) -> dict:
    """Held-out metrics: zero-shot classification and caption <-> image retrieval."""
    model.eval()
    img = _encode_images(model, images, table)
    cap = _encode_texts(model, tokenizer, captions, max_len)
    out: dict = {"n": len(images)}
    if truth is not None and {"category", "colour"} <= set(truth["attrs"]):
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
        out["zero_shot"] = zs
        key = (cat * len(cols) + col).astype(np.int64)
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


# --------------------------------------------------------------------------- driver
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


def _save_pretrained(model, processor, out: Path) -> list[str]:
    """save_pretrained into a temporary folder next to ``out``, then rename file by file."""
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


def build_demo_backbone(data_dir: str | Path, out_dir: str | Path, cfg: DemoBackboneConfig,
                        seed: int = 0, log: Callable[[str], None] = print,
                        return_model: bool = False) -> dict:
    """Pretrain a small CLIP on the catalog's (image, generic caption) pairs; save it to
    ``out_dir`` as an HF checkpoint with its processor; returns a summary dict.

    ``out_dir`` gets the model (``config.json``, ``model.safetensors``), the processor
    (``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ...),
    ``log.jsonl`` (one line per epoch) and, written last, ``pretrain_metrics.json``.
    Deterministic for a seed (and thread count); the caller's torch RNG state is untouched.
    Returns ``{"out_dir", "n_params", "epochs", "seconds", "final_loss", "heldout"}``, plus the
    in-memory ``"model"`` (eval mode) and ``"processor"`` if ``return_model``.
    """
    from transformers import CLIPModel, CLIPProcessor

    t0 = time.perf_counter()
    _check(cfg)
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)        # written last: present = complete
    (out / LOG_FILE).unlink(missing_ok=True)

    items = read_catalog(data_dir)
    captions_by_id = _read_captions(data_dir)
    missing = [it for it in items if it.item_id not in captions_by_id]
    if missing:
        raise InputError(data_dir / CAPTIONS_FILE, f"no caption for item_id "
                                                   f"{missing[0].item_id!r} ({len(missing)} items "
                                                   "without one)")
    captions = [captions_by_id[it.item_id] for it in items]
    truth = _read_truth(data_dir, [it.item_id for it in items])
    n = len(items)
    n_hold = round(cfg.holdout * n)
    if n_hold < 2 or n - n_hold < 2:
        raise InputError(data_dir, f"{n} items are too few for demo_backbone.holdout="
                                   f"{cfg.holdout} (need >= 2 held out and >= 2 to train on)")

    no_image = next((it for it in items if not it.image), None)
    if no_image is not None:
        raise InputError(data_dir / "items.jsonl", "missing", line=no_image.line, field="image")

    corpus = captions + [it.encoder_text for it in items]
    tokenizer = build_tokenizer(corpus, max_len=cfg.max_text_len)
    image_processor = build_image_processor(cfg.image_size)
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    table = normalisation_table(image_processor)
    log(f"tokenizer: {len(tokenizer)} tokens; loading {n} images")
    images = load_images([data_dir / it.image for it in items], image_processor, cfg.image_size)
    tok = tokenizer(captions, padding=True, truncation=True, max_length=cfg.max_text_len,
                    return_tensors="pt")
    input_ids, attention_mask = tok["input_ids"], tok["attention_mask"]

    perm = np.random.default_rng([seed, 7]).permutation(n)
    hold, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    train_t = torch.from_numpy(train)
    bs = min(cfg.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // bs)          # last partial batch dropped
    total = steps_per_epoch * cfg.epochs

    epochs: list[dict] = []
    t_train = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(cfg, tokenizer))
        gen = torch.Generator().manual_seed(seed)
        opt = _optimizer(model, cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo CLIP: {n_params / 1e6:.2f} M parameters; {len(train)} train / {n_hold} "
            f"held-out items; {cfg.epochs} epochs x {steps_per_epoch} steps of {bs}")
        for epoch in range(1, cfg.epochs + 1):
            te = time.perf_counter()
            model.train()
            order = train_t[torch.randperm(len(train_t), generator=gen)]
            losses = []
            for s in range(steps_per_epoch):
                idx = order[s * bs:(s + 1) * bs]
                ids, mask = input_ids[idx], attention_mask[idx]
                width = int(mask.sum(1).max())                   # trim common padding
                img = model.get_image_features(
                    pixel_values=normalise_images(images[idx], table)).pooler_output
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
                losses.append(loss.item())
            rec = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5),
                   "lr": float(opt.param_groups[0]["lr"]),
                   "logit_scale": round(model.logit_scale.exp().item(), 3),
                   "seconds": round(time.perf_counter() - te, 2)}
            epochs.append(rec)
            append_jsonl(out / LOG_FILE, rec)
            log(f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.4f}, "
                f"logit scale {rec['logit_scale']:.1f}, {rec['seconds']:.1f} s")
        train_seconds = time.perf_counter() - t_train

        hold_t = torch.from_numpy(hold)
        hold_truth = None if truth is None else \
            {"vocab": truth["vocab"], "attrs": {a: v[hold] for a, v in truth["attrs"].items()}}
        heldout = evaluate(model, tokenizer, images[hold_t], [captions[i] for i in hold],
                           table, hold_truth, cfg.max_text_len)
    model.eval()
    files = _save_pretrained(model, processor, out)
    seconds = round(time.perf_counter() - t0, 2)
    metrics = {
        "format": "ptmrec-demo-backbone/1",
        "data_dir": str(data_dir), "seed": seed, "config": dataclasses.asdict(cfg),
        "n_items": n, "n_train": len(train), "n_heldout": n_hold,
        "n_params": int(n_params), "vocab_size": len(tokenizer),
        "steps": total, "batch_size": bs, "train_seconds": round(train_seconds, 2),
        "seconds": seconds, "train_loss": [e["loss"] for e in epochs], "epochs": epochs,
        "heldout": heldout, "files": files,
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    zs = heldout.get("zero_shot", {}).get("colour_category")
    if zs:
        log(f"held-out zero-shot colour+category accuracy {zs['accuracy']:.3f} "
            f"(chance {zs['chance']:.3f}); saved to {out}")
    summary = {"out_dir": str(out), "n_params": int(n_params), "epochs": cfg.epochs,
               "seconds": seconds, "final_loss": epochs[-1]["loss"], "heldout": heldout}
    if return_model:
        summary.update(model=model, processor=processor)
    return summary

"""How far can each PEFT method make the backbone's features encode the attributes its
pretraining never named (issue 18, headroom)? A supervised probe on the synthetic benchmark.

    .venv/bin/python bench/probe_adapt.py [--data-seeds 0 1 2] [--items N --users 1600]
        [--methods frozen prompt full] [--epochs 30] [--design v2] [--work out/claims-v2]
        [k=v ...]

For each data seed (the inputs of ``bench/claims.py``: the same synthetic set, split and demo
backbone, built once under ``WORK/data<d>/inputs``), each hidden attribute (truth.json's
attributes the pretraining captions do not name: shape, pattern, material) and each modality
that shows it (truth.json's ``visibility``), and each method: the tower's features (the
backbone's ``encode_images`` / ``encode_texts``, exactly what extraction and stage 2 use) go
through a linear classifier of the attribute (on standardised features), trained with
cross-entropy together with what the method makes trainable (``prompt``: the deep prompts of
``stage2.prompt_len`` x ``stage2.prompt_depth``; ``full``: every weight of the tower;
``frozen``: nothing). Every method's features are then read out the same way: the ridge probe of
``ptmrec diagnose`` fit on the train items. Items are split 60/20/20 (seeded by the data seed);
each method's learning rate is chosen from ``LRS`` and its epoch (-1: the starting features) on
the readout's valid accuracy; test accuracy is read at that choice. Chance is 1 / the
attribute's vocabulary size.

What it says: whether the method has the capacity to close the gap the recommender needs; a
method that cannot make the features encode ``pattern`` even when told the labels cannot be
expected to learn it from interactions. Runs resume one by one (``bench.json`` under
``WORK/data<d>/probe/``). Writes ``OUT/probe_adapt.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _util import resumable, write_result  # noqa: E402

# learning rates tried per method (the classifier's own rate is HEAD_LR); chosen on valid
LRS = {"frozen": [0.0], "prompt": [1e-2, 3e-2], "full": [1e-4, 3e-4]}
HEAD_LR = 1e-2
BATCH = 64
SPLIT = (0.6, 0.2)          # train, valid shares of the items; the rest is test
STREAM = 18                 # this bench's seed stream: [data seed, STREAM(, 1)]


def item_inputs(cfg, backbone) -> dict:
    """Every item's uint8 image, text and true attributes, in item-index order."""
    from ptmrec_dist.clip.demo_eval import read_truth
    from ptmrec_dist.clip.images import load_images
    from ptmrec_dist.data.catalog import read_catalog

    data = Path(cfg.data.path)
    items = read_catalog(data)
    truth = read_truth(data, [it.item_id for it in items])
    raw = json.loads((data / "truth.json").read_text())
    size = backbone.image_size
    images = load_images([data / it.image for it in items], backbone.processor.image_processor,
                         size)
    return {"images": images, "texts": [it.encoder_text for it in items],
            "attrs": truth["attrs"], "vocab": truth["vocab"],
            "visibility": raw["visibility"], "caption": raw["caption_attributes"]}


def encode(backbone, inputs: dict, modality: str, idx, table):
    import torch

    from ptmrec_dist.clip.images import normalise_images
    if modality == "image":
        return backbone.encode_images(normalise_images(inputs["images"][idx], table))
    tok = inputs["tok"]          # tokenised by the adapted backbone (prompts take positions)
    ids, mask = tok["input_ids"][idx], tok["attention_mask"][idx]
    width = int(mask.sum(1).max())                   # trim the batch's padding
    return backbone.encode_texts(ids[:, :width], mask[:, :width]).to(torch.float32)


def probe_one(cfg, inputs: dict, method: str, attribute: str, modality: str, lr: float,
              epochs: int, seed: int) -> dict:
    """Train (classifier + the method's trainable weights), pick the epoch on valid accuracy;
    valid and test accuracy at that epoch."""
    import torch
    from torch import nn

    from ptmrec_dist.clip.backbone import load_backbone
    from ptmrec_dist.clip.images import normalisation_table
    from ptmrec_dist.clip.methods import apply_method
    from ptmrec_dist.diagnose import ridge_probe

    torch.manual_seed(seed)
    c = copy.deepcopy(cfg)
    c.peft.method = method
    c.backbone.modalities = modality
    backbone = apply_method(load_backbone(c.backbone), c)
    table = normalisation_table(backbone.processor.image_processor)
    if modality == "text":
        inputs = {**inputs, "tok": backbone.tokenize(inputs["texts"])}
    labels = torch.as_tensor(inputs["attrs"][attribute])
    n = len(labels)
    order = np.random.default_rng([seed, STREAM]).permutation(n)
    n_train, n_valid = int(SPLIT[0] * n), int(SPLIT[1] * n)
    train, valid, test = np.split(order, [n_train, n_train + n_valid])
    dim = backbone.image_dim if modality == "image" else backbone.text_dim
    head = nn.Linear(dim, len(inputs["vocab"][attribute]))
    groups = [{"params": list(head.parameters()), "lr": HEAD_LR}]
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    if trainable:
        groups.append({"params": trainable, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def all_features(idx) -> torch.Tensor:
        with torch.no_grad():
            backbone.eval()
            return torch.cat([encode(backbone, inputs, modality, idx[s:s + 256], table)
                              for s in range(0, len(idx), 256)])

    start = all_features(np.arange(n))
    # a fixed preconditioner for every method: standardise each dimension by the starting
    # features' train statistics (the head then converges in a few epochs on raw CLIP scales)
    mu, sd = start[train].mean(0), start[train].std(0).clamp_min(1e-6)

    def features(idx) -> torch.Tensor:
        return (encode(backbone, inputs, modality, idx, table) - mu) / sd

    def readout(feats: torch.Tensor) -> dict:
        """The same ridge readout for every method (``ptmrec diagnose``'s probe: fit on the
        train items, its lambda chosen inside them): accuracy on valid and on test."""
        f, y = feats.numpy(), labels.numpy()
        return {"valid": ridge_probe(f, y, train, valid), "test": ridge_probe(f, y, train, test)}

    best = {**readout(start), "epoch": -1}                 # the starting features
    if not trainable:
        epochs = 0                                          # frozen: the readout is the probe
    rng = np.random.default_rng([seed, STREAM, 1])
    for epoch in range(epochs):
        backbone.train()
        perm = train[rng.permutation(len(train))]
        for s in range(0, len(perm), BATCH):
            idx = np.sort(perm[s:s + BATCH])
            loss = nn.functional.cross_entropy(head(features(idx)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        r = readout(all_features(np.arange(n)))
        if r["valid"] > best["valid"]:                      # chosen on valid only
            best = {**r, "epoch": epoch}
    n_params = sum(p.numel() for p in backbone.parameters())
    return {**best, "trainable_pct": round(100 * sum(p.numel() for p in trainable) / n_params, 4),
            "chance": 1 / len(inputs["vocab"][attribute])}


def markdown(summary: dict, methods: list[str]) -> str:
    lines = ["| attribute (modality) | chance | " + " | ".join(
        f"{m}: test acc. (trained %)" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for key, ms in summary.items():
        chance = next(iter(ms.values()))["runs"][0]["chance"]
        cells = []
        for m in methods:
            r = ms.get(m)
            cells.append("-" if r is None else
                         f"{r['test_mean']:.3f} ± {r['test_std']:.3f} "
                         f"({r['runs'][0]['trainable_pct']:g} %)")
        lines.append(f"| {key} | {chance:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hidden_pairs(inputs: dict) -> list[tuple[str, str]]:
    """(attribute, modality) for each attribute the captions never name and each modality that
    shows it."""
    return [(a, m) for a, mods in inputs["visibility"].items() if a not in inputs["caption"]
            for m in ("image", "text") if m in mods]


def probe_seed(cfg, work: Path, d: int, methods: list[str], epochs: int) -> dict:
    """{"attribute (modality)": {method: the run chosen on valid}} of data seed ``d``, whose
    prepared inputs are ``cfg``; runs resume under ``WORK/data<d>/probe/``."""
    from ptmrec_dist.clip.backbone import load_backbone
    inputs = item_inputs(cfg, load_backbone(cfg.backbone))
    rows: dict = {}
    for method in methods:
        for attribute, modality in hidden_pairs(inputs):
            runs = []
            for lr in LRS[method]:
                out = work / f"data{d}" / "probe" / f"{attribute}-{modality}" / \
                    f"{method}-lr{lr:g}-e{epochs}"
                runs.append(resumable(out, f"data {d} {attribute} ({modality}) {method} "
                                      f"lr {lr:g}", lambda lr=lr, a=attribute, m=modality: dict(
                                          probe_one(cfg, inputs, method, a, m, lr, epochs, d),
                                          lr=lr)))
            chosen = max(runs, key=lambda r: r["valid"])      # on valid only
            rows.setdefault(f"{attribute} ({modality})", {})[method] = {"data_seed": d, **chosen}
    return rows


def main() -> int:
    import claims
    ap = claims.input_args(argparse.ArgumentParser())
    ap.add_argument("--methods", nargs="+", default=list(LRS), choices=list(LRS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="key=value for the inputs and the backbone")
    args = claims.resolve_inputs(ap.parse_args())
    import torch
    torch.set_num_threads(2)
    work = Path(args.work)
    t0 = time.perf_counter()
    rows: dict = {}
    for d in args.data_seeds:
        cfg = claims.prepare(work, d, args.items, args.users, args.overrides)
        for key, ms in probe_seed(cfg, work, d, args.methods, args.epochs).items():
            for method, chosen in ms.items():
                rows.setdefault(key, {}).setdefault(method, []).append(chosen)
    summary = {key: {m: {"valid_mean": float(np.mean([r["valid"] for r in rs])),
                         "test_mean": float(np.mean([r["test"] for r in rs])),
                         "test_std": float(np.std([r["test"] for r in rs])),
                         "runs": rs} for m, rs in ms.items()} for key, ms in rows.items()}
    result = {**claims.inputs_record(args), "epochs": args.epochs, "lrs": LRS,
              "head_lr": HEAD_LR, "summary": summary,
              "markdown": markdown(summary, args.methods),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, "probe_adapt", result)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``ptmrec encode-items --run RUN --catalog NEW --out DIR``: items that were never in training
(cold start), encoded and scored by a finished run.

1. The new catalog (``ptmrec catalog --items new.csv --out NEW``, no interactions needed) is
   sharded into ``DIR/shards``.
2. Its items are encoded by the run's encoders into ``DIR/features``: a stage-2 run's tuned
   encoders (``extract --adapter RUN``), or, for a stage-1 run, the frozen backbone (and text
   tower) that made the features the run was trained on (named in their ``meta.json``; the
   loaded weights must have the recorded sha256).
3. The run's recommender (its best weights) turns the features into item representations by
   its content branch (:meth:`~ptmrec_dist.rec.base.Recommender.content_representations`: no
   ID embedding, no graph), written as ``DIR/item_repr.npy`` (rows in the order of
   ``DIR/item_ids.txt``, the catalog's raw ids) with ``DIR/encode.json``.

``ptmrec recommend --run RUN --new-items DIR`` then ranks them with the run's users
(:class:`~ptmrec_dist.eval.recommend.RunRecommender`); the run's held-out items of
``data.cold_items`` are scored the same way, which is what ``evaluate --split cold`` measures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ptmrec_dist.config import load_config
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.io import atomic_save_npy, atomic_write_json, atomic_write_text

IDS, REPR, SUMMARY = "item_ids.txt", "item_repr.npy", "encode.json"


def _features_meta(run: Path, cfg) -> tuple[Path, dict]:
    """The folder and ``meta.json`` of the features the run ranked with."""
    folder = run / "features" if (run / "adapter.safetensors").is_file() else \
        Path(cfg.data.features)
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise InputError(meta_file, "missing: encode-items needs to know which encoders made "
                                    "the run's features (features written by `ptmrec "
                                    "extract`, not MMRec's .npy files)")
    return folder, json.loads(meta_file.read_text())


def _new_item_ids(catalog: Path, n: int) -> list[str]:
    """Raw id of each index of the new catalog: its ``item_mapping.tsv`` (``ptmrec catalog``),
    else the index itself."""
    from ptmrec_dist.eval.recommend import read_mapping

    mapping = catalog / "item_mapping.tsv"
    if mapping.is_file():
        return read_mapping(mapping, n).tolist()
    return [str(i) for i in range(n)]


def load_run_model(run: Path, cfg):
    """The run's recommender with its best weights (as trained: the run's interactions and
    features build it), in eval mode."""
    from safetensors.torch import load_file

    from ptmrec_dist.data.interactions import load_interactions
    from ptmrec_dist.train.stage1 import build_model

    weights = run / "checkpoints" / "best" / "model.safetensors"
    if not weights.is_file():
        raise InputError(weights, "missing: not a finished stage-1/stage-2 run")
    inter = load_interactions(cfg.data.path, cfg.data, warn=lambda _m: None)
    model = build_model(cfg, inter)
    state = load_file(str(weights))
    if (run / "adapter.safetensors").is_file():
        # stage 2's student holds its features as buffers (the feature bank), not parameters
        model.set_modal_inputs({m: t.detach() for m, t in model.item_modal_inputs().items()})
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(weights, f"does not fit the model its config.yaml builds: {exc}") \
            from None
    return model.eval()


def encode_items(run: str | Path, catalog: str | Path, out: str | Path,
                 backbone: str | None = None, log=None) -> dict:
    from ptmrec_dist.clip.extract import FEATURE_GATE, read_feature_gate, run_extract
    from ptmrec_dist.data.shards import write_shards
    from ptmrec_dist.dist import DistEnv
    from ptmrec_dist.rec.features import load_item_features, modality_names

    from ptmrec_dist.logs import get_logger

    log = log or get_logger(__name__).info
    run, catalog, out = Path(run), Path(catalog), Path(out)
    if not (run / "config.yaml").is_file():
        raise InputError(run / "config.yaml", "missing: not a run folder")
    cfg = load_config(run / "config.yaml")
    stage2 = (run / "adapter.safetensors").is_file()
    if stage2 and cfg.stage2.feature_gate and read_feature_gate(run) is None:
        raise ConfigError(f"{run} was trained with stage2.feature_gate but has no "
                          f"{FEATURE_GATE} (a run of before the best epoch's gate was saved): "
                          "its features mix the frozen and the adapted encoders by a gate "
                          "value it did not keep, so new items cannot be encoded alike")
    _, meta = _features_meta(run, cfg)
    manifest = write_shards(catalog, out / "shards", shard_size=cfg.data.shard_size,
                            image_size=cfg.data.image_size, quality=cfg.data.jpeg_quality,
                            log=log)
    ecfg = dataclasses.replace(cfg, extract=dataclasses.replace(
        cfg.extract, feature_dtype=meta.get("dtype", cfg.extract.feature_dtype)))
    if not stage2:
        ecfg = dataclasses.replace(ecfg, backbone=dataclasses.replace(
            cfg.backbone, name_or_path=backbone or meta["backbone"],
            text_tower=meta.get("text_tower") or ""))
    elif backbone:
        ecfg = dataclasses.replace(ecfg, backbone=dataclasses.replace(
            cfg.backbone, name_or_path=backbone))
    new_meta = run_extract(ecfg, out / "shards", out / "features", DistEnv(), log=log,
                           adapter=run if stage2 else None)
    if not stage2 and meta.get("weights_hash") and \
            new_meta["weights_hash"] != meta["weights_hash"]:
        raise InputError(out / "features" / "meta.json",
                         f"the backbone {new_meta['backbone']} has weights sha256 "
                         f"{new_meta['weights_hash'][:12]}..., but the run's features were made "
                         f"by weights {meta['weights_hash'][:12]}...: give the run's backbone "
                         "(--backbone)")
    n_new = int(manifest["n_items"])
    feats = load_item_features(out / "features", n_new, modality_names(cfg.backbone.modalities))
    model = load_run_model(run, cfg)
    with torch.no_grad():
        modal = {m: torch.from_numpy(feats.get(m)) for m in model.item_modal_inputs()}
        reprs = model.content_representations(modal).float().numpy()
    ids = _new_item_ids(catalog, n_new)
    atomic_save_npy(out / REPR, reprs)
    atomic_write_text(out / IDS, "".join(f"{i}\n" for i in ids))
    summary = {"run": str(run), "catalog": str(catalog), "n_items": n_new,
               "encoders": "stage-2 adapter" if stage2 else "frozen backbone",
               "backbone": new_meta["backbone"], "model": model.name,
               "repr_dim": int(reprs.shape[1]), "missing_items": new_meta.get("n_missing", 0)}
    atomic_write_json(out / SUMMARY, summary)
    return summary


def read_new_items(folder: str | Path, repr_dim: int) -> tuple[list[str], np.ndarray]:
    """``(raw ids, representations)`` of an ``encode-items`` output folder, checked against the
    run's representation width."""
    folder = Path(folder)
    from ptmrec_dist.rec.features import read_representations

    for name in (IDS, REPR):
        if not (folder / name).is_file():
            raise InputError(folder / name, "missing: not an `ptmrec encode-items` output folder")
    reprs = read_representations(folder / REPR, "item")
    ids = [line for line in (folder / IDS).read_text(encoding="utf-8").splitlines() if line]
    if len(ids) != reprs.shape[0]:
        raise InputError(folder / IDS, f"{len(ids)} ids for {reprs.shape[0]} representations")
    if reprs.shape[1] != repr_dim:
        raise InputError(folder / REPR, f"{reprs.shape[1]}-d representations, the run's are "
                                        f"{repr_dim}-d: encoded by another run")
    return ids, reprs

"""Stage 2's task: the adapted backbone and the student recommender as one module, the stage-1
teacher it learns from, and the knowledge-guided initialisation of the prompts.

The training loop around it is :mod:`ptmrec_dist.train.stage2`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.methods import apply_method
from ptmrec_dist.config import Config, load_config
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.rec.base import terms
from ptmrec_dist.train.losses import in_batch_bpr, kt_loss


class Stage2Model(nn.Module):
    """What the engine runs: adapted backbone + student; ``batch -> (loss terms, features)``,
    the features being the adapted backbone's (detached) features of the batch items, which the
    loop writes into the feature bank."""

    def __init__(self, backbone, student, teacher: dict | None, kt_weight: float, tau: float):
        super().__init__()
        self.backbone, self.student = backbone, student
        self.kt_weight, self.tau = kt_weight, tau
        self.has_teacher = teacher is not None
        if teacher is not None:
            self.register_buffer("teacher_users", teacher["users"], persistent=False)
            self.register_buffer("teacher_items", teacher["items"], persistent=False)

    def forward(self, batch: dict) -> tuple[dict, dict]:
        wanted = self.student.modalities       # a tower the student does not read never runs
        dtype = next(self.student.parameters()).dtype
        modal = {}
        if "image" in wanted:
            modal["image"] = self.backbone.encode_images(batch["pixel_values"]).to(dtype)
        if "text" in wanted:
            modal["text"] = self.backbone.encode_texts(batch["input_ids"],
                                                       batch["attention_mask"]).to(dtype)
        users, items = batch["users"], batch["items"]
        out = self.student.stage2_scores(users, items, modal)
        bpr = sum(w * in_batch_bpr(s, batch["known"], batch.get("row_weights"), batch["pos"])
                  for w, s in out["bpr"])
        values = {"bpr": bpr, "reg": out["reg"]}
        loss = bpr + out["reg"]
        if self.has_teacher:
            teacher_scores = (self.teacher_users[users].float()
                              @ self.teacher_items[items].float().T)
            kt = kt_loss(teacher_scores, out["student"], self.tau)
            values["kt"] = kt
            loss = loss + self.kt_weight * kt
        return (terms(loss=loss * batch["weight"], **values),
                {m: f.detach() for m, f in modal.items()})


def check_stage2_config(cfg: Config) -> None:
    if not cfg.data.shards:
        raise ConfigError("stage 2 streams items from shards: set data.shards "
                          "(`ptmrec shard`)")
    if cfg.stage2.kt_weight > 0 and not cfg.stage2.teacher:
        raise ConfigError("config key 'stage2.kt_weight' > 0 needs a teacher: set "
                          "stage2.teacher to a stage-1 run folder (or kt_weight=0 for one "
                          "stage)")


def load_teacher(cfg: Config) -> dict | None:
    """The stage-1 run in ``stage2.teacher``: representations, weights, and its config (whose
    recommender must be the one configured here)."""
    if not cfg.stage2.teacher:
        return None
    run = Path(cfg.stage2.teacher)
    files = {k: run / f for k, f in (("users", "user_repr.npy"), ("items", "item_repr.npy"),
                                      ("weights", "checkpoints/best/model.safetensors"),
                                      ("config", "config.yaml"))}
    for f in files.values():
        if not f.is_file():
            raise InputError(f, "missing: stage2.teacher must be a finished `ptmrec stage1` run")
    tcfg = load_config(files["config"])
    for section, key in (("recommender", "name"), ("recommender", "embedding_dim"),
                         ("recommender", "feat_embed_dim"), ("backbone", "modalities")):
        mine = getattr(getattr(cfg, section), key)
        theirs = getattr(getattr(tcfg, section), key)
        if mine != theirs:
            raise ConfigError(f"config key '{section}.{key}' is {mine!r} but the teacher "
                              f"{run} was trained with {theirs!r}")
    return {"users": torch.from_numpy(np.load(files["users"])),
            "items": torch.from_numpy(np.load(files["items"])),
            "weights": files["weights"], "run": str(run)}


def build_student(cfg: Config, inter, teacher: dict | None, device):
    """``(student, frozen features)``: the stage-1 recommender on the frozen backbone's
    features, with the teacher's weights (from scratch in one-stage runs). The frozen features
    are also what the knowledge-guided initialisation reads."""
    from ptmrec_dist import rec
    from ptmrec_dist.rec.features import resolve_features
    from ptmrec_dist.train.stage1 import build_model

    name = cfg.recommender.name
    if not rec.model_class(name).needs_features:
        raise ConfigError(f"recommender.name={name} uses no item features: stage 2 "
                          "adapts the backbone that produces them (use vbpr, freedom or bm3)")
    frozen = resolve_features(cfg.data, inter.path, inter.n_items, required=True,
                              modalities=cfg.backbone.modalities)
    student = build_model(cfg, inter, frozen)
    if teacher is not None:
        from safetensors.torch import load_file
        student.load_state_dict(load_file(str(teacher["weights"])))
    return student.to(device), frozen


def build_backbone(cfg: Config, frozen_features, teacher: dict | None, device):
    """``(backbone, weights hash, knowledge_guided)``: the frozen backbone with the configured
    PEFT method applied; prompts initialised from the teacher under ``peft.prompt_init=teacher``.
    The hash of the pretrained weights goes into every checkpoint (a resumed run must rebuild
    the same backbone)."""
    from ptmrec_dist.clip.compile import compile_layers

    torch.manual_seed(cfg.seed)              # the same prompts / adapters on every rank
    frozen = load_backbone(cfg.backbone)
    weights_hash = frozen.weights_hash()
    backbone = apply_method(frozen, cfg)
    if cfg.stage2.compile:
        compile_layers(backbone)
    guided = False
    if backbone.prompts is not None and cfg.peft.prompt_init == "teacher":
        if teacher is None:
            raise ConfigError("peft.prompt_init=teacher needs stage2.teacher; use "
                              "peft.prompt_init=random for one-stage runs")
        init_prompts_from_teacher(backbone, frozen_features, teacher["items"])
        guided = True
    return backbone.to(device), weights_hash, guided


def init_prompts_from_teacher(backbone, feats, teacher_items: torch.Tensor) -> dict:
    """Knowledge-guided prompt initialisation: each tower's prompts start as the directions of
    its feature space that the teacher's item representations load on most
    (:func:`~ptmrec_dist.clip.prompts.teacher_directions`), mapped into the tower's width by the
    pseudo-inverse of its projection and scaled like the tokens they sit among. A BERT-style
    ``backbone.text_tower`` pools in its hidden space (identity projection) and its prompts sit
    among post-LayerNorm tokens (:func:`~ptmrec_dist.clip.text_prompts.init_space`)."""
    from ptmrec_dist.clip.prompts import teacher_directions, to_width
    from ptmrec_dist.clip.text_prompts import init_space

    learner, clip = backbone.prompts, backbone.clip
    n = learner.prompt_len
    if backbone.text_tower is None:
        text = (clip.text_projection.weight,
                float(clip.text_model.embeddings.token_embedding.weight.norm(dim=1).mean()))
    else:
        text = init_space(backbone.text_tower.encoder)
    out = {}
    prompted = {"text": learner.text is not None,
                "image": learner.vision is not None or learner.coupled}
    for m, proj, scale in (
            ("text", *text),
            ("image", clip.visual_projection.weight,
             float(clip.vision_model.pre_layrnorm.weight.norm()))):
        if not prompted[m]:          # backbone.modalities leaves this tower without prompts
            continue
        f = feats.get(m)
        if f is None or f.shape[1] != proj.shape[0]:
            raise ConfigError(f"peft.prompt_init=teacher needs {m} features of this backbone "
                              f"({proj.shape[0]}-d) in data.features; set peft.prompt_init=random")
        out[m] = to_width(teacher_directions(f, teacher_items.numpy(), n), proj, scale)
    learner.init_from(out.get("text"), out.get("image"))
    return {m: v.shape for m, v in out.items()}


def check_dims(student, bank: dict) -> None:
    """The student's modal inputs and the backbone's features have the same widths."""
    for m, table in student.item_modal_inputs().items():
        if table.shape[1] != bank[m].shape[1]:
            raise ConfigError(f"the recommender's {m} inputs are {table.shape[1]}-d "
                              f"(data.features) but the backbone gives {bank[m].shape[1]}-d: "
                              "stage 2 needs data.features extracted with backbone.name_or_path")

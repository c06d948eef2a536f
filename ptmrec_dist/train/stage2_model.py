"""Stage 2's task: the adapted backbone and the student recommender as one module (with the
optional feature gate and the KT target), the stage-1 teacher it learns from, the optimizer's
backbone groups, the per-loss gradient-norm probe, and the knowledge-guided initialisation of the
prompts.

The training loop around it is :mod:`ptmrec_dist.train.stage2`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ptmrec_dist import dist
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.methods import apply_method, tower_of
from ptmrec_dist.config import Config, load_config
from ptmrec_dist.errors import ConfigError, InputError
from ptmrec_dist.logs import get_logger
from ptmrec_dist.plan.activations import resolve_checkpointing
from ptmrec_dist.rec.base import terms
from ptmrec_dist.rec.features import read_representations
from ptmrec_dist.train.losses import in_batch_bpr, kt_loss

_log = get_logger(__name__)


class FeatureGate(nn.Module):
    """``stage2.feature_gate``: the student reads ``ref + g_m * (adapted - ref)`` per modality,
    ``ref`` being the frozen features stage 1 was trained on (``data.features``) and ``g_m`` a
    learned scalar starting at 0. So the ranking before any step *is* stage 1's (vbpr's item
    projection, FREEDOM's item graph, which is rebuilt from the bank, read the same features),
    whatever the PEFT method puts into the backbone; its gradient then reaches the backbone as
    ``g_m`` grows."""

    def __init__(self, reference: dict[str, torch.Tensor]):
        super().__init__()
        self.modalities = sorted(reference)
        for m in self.modalities:
            self.register_buffer(f"ref_{m}", reference[m].detach().clone(), persistent=False)
            setattr(self, f"gate_{m}", nn.Parameter(torch.zeros(1)))

    def forward(self, items: torch.Tensor | None, modal: dict) -> dict:
        """Gated features of ``items`` (None: every item, in index order)."""
        out = {}
        for m, f in modal.items():
            ref = getattr(self, f"ref_{m}")
            ref = ref if items is None else ref[items.to(ref.device)]
            gate = getattr(self, f"gate_{m}")
            ref, gate = ref.to(f.device, f.dtype), gate.to(f.device, f.dtype)
            out[m] = ref + gate * (f - ref)
        return out

    def values(self) -> dict[str, float]:
        return {m: round(v, 6) for m, v in self.exact_values().items()}

    def exact_values(self) -> dict[str, float]:
        """``{modality: g}`` as Python floats (a float32 round-trips exactly)."""
        return {m: float(getattr(self, f"gate_{m}").detach().float().cpu())
                for m in self.modalities}


class Stage2Model(nn.Module):
    """What the engine runs: adapted backbone + student; ``batch -> (loss terms, features)``,
    the features being the adapted backbone's (detached) features of the batch items, which the
    loop writes into the feature bank.

    ``kt_target`` (``stage2.kt_target``) pairs the KT loss's two score matrices:

    * ``full-content``: the teacher's full scores (its exported representations, ID part
      included) against the student's content head (vbpr: user's second half . projected
      features; freedom/bm3: their modal head);
    * ``full``: the teacher's full scores against the student's full (ranking) scores;
    * ``content``: the teacher's own content head (the frozen stage-1 model on its own modal
      inputs, ``teacher_head``) against the student's content head.

    With ``probe_grads`` set, a forward also measures, per loss term, the gradient norm that
    reaches the backbone's trainable weights and the recommender's (``last_grad_norms``; an
    extra backward per term, ZeRO-0/1/2 only)."""

    KT_TARGETS = ("full-content", "full", "content")

    def __init__(self, backbone, student, teacher: dict | None, kt_weight: float, tau: float,
                 kt_target: str = "full-content", teacher_head=None,
                 gate: FeatureGate | None = None):
        super().__init__()
        self.backbone, self.student, self.gate = backbone, student, gate
        self.kt_weight, self.tau, self.kt_target = kt_weight, tau, kt_target
        self.has_teacher = teacher is not None
        if teacher is not None:
            self.register_buffer("teacher_users", teacher["users"], persistent=False)
            self.register_buffer("teacher_items", teacher["items"], persistent=False)
        # not a submodule: nothing of it trains, and the engine must not cast or partition it
        object.__setattr__(self, "teacher_head", teacher_head)
        self.probe_grads, self.last_grad_norms = False, {}

    def _teacher_scores(self, users, items) -> torch.Tensor:
        if self.kt_target == "content":
            head = self.teacher_head
            with torch.no_grad():
                modal = {m: t[items] for m, t in head.item_modal_inputs().items()}
                return head.stage2_scores(users, items, modal)["student"].float()
        return self.teacher_users[users].float() @ self.teacher_items[items].float().T

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
        if self.gate is not None:
            modal = self.gate(items, modal)
        out = self.student.stage2_scores(users, items, modal)
        bpr = sum(w * in_batch_bpr(s, batch["known"], batch.get("row_weights"), batch["pos"])
                  for w, s in out["bpr"])
        values = {"bpr": bpr, "reg": out["reg"]}
        loss = bpr + out["reg"]
        if self.has_teacher:
            student = out["bpr"][0][1] if self.kt_target == "full" else out["student"]
            kt = kt_loss(self._teacher_scores(users, items), student, self.tau)
            values["kt"] = kt
            loss = loss + self.kt_weight * kt
        if self.probe_grads:
            self.last_grad_norms = self._grad_norms(values)
        return (terms(loss=loss * batch["weight"], **values),
                {m: f.detach() for m, f in modal.items()})

    def _grad_norms(self, values: dict) -> dict:
        """Per loss term (as weighted in the total), the L2 norm of its gradient on the
        backbone's and on the recommender's trainable weights."""
        gate = list(self.gate.parameters()) if self.gate is not None else []
        groups = {"backbone": [p for p in self.backbone.parameters() if p.requires_grad] + gate,
                  "recommender": [p for p in self.student.parameters() if p.requires_grad]}
        weights = {"kt": self.kt_weight}
        norms = {}
        for name, value in values.items():
            if not value.requires_grad:
                continue
            params = groups["backbone"] + groups["recommender"]
            grads = torch.autograd.grad(weights.get(name, 1.0) * value, params,
                                        retain_graph=True, allow_unused=True)
            split = len(groups["backbone"])
            norms[name] = {
                group: sum(float((g.float() ** 2).sum()) for g in part if g is not None) ** 0.5
                for group, part in (("backbone", grads[:split]), ("recommender", grads[split:]))}
        return norms


def backbone_groups(model: Stage2Model, stage) -> list[dict]:
    """The backbone's trainable weights (and the feature gate's) as optimizer groups: one at
    ``stage2.lr``, or, with ``stage2.text_lr`` / ``stage2.vision_lr`` set, one per tower at its
    own rate (0: ``stage2.lr``)."""
    params = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    if model.gate is not None:
        params += list(model.gate.named_parameters())
    if not (stage.text_lr or stage.vision_lr):
        return [{"params": [p for _, p in params], "lr": stage.lr}]
    rates = {"text": stage.text_lr or stage.lr, "vision": stage.vision_lr or stage.lr}
    return [{"params": [p for n, p in params if tower_of(n) == tower], "lr": rates[tower]}
            for tower in ("text", "vision")]


class GradNormProbe:
    """``stage2.grad_norms_every``: every N-th micro step the model measures each loss term's
    gradient norm on the backbone and on the recommender; the epoch record gets their means
    (``grad_norms``: {term: {backbone, recommender}}, this rank's steps)."""

    def __init__(self, model: Stage2Model, every: int):
        self.model, self.every = model, every
        self.sums: dict[str, dict[str, float]] = {}
        self.n = 0

    def before(self, step: int) -> None:
        self.model.probe_grads = bool(self.every) and step % self.every == 0

    def after(self) -> None:
        if not self.model.probe_grads:
            return
        self.model.probe_grads = False
        self.n += 1
        for term, groups in self.model.last_grad_norms.items():
            acc = self.sums.setdefault(term, {})
            for group, value in groups.items():
                acc[group] = acc.get(group, 0.0) + value

    def record(self) -> dict:
        if not self.n:
            return {}
        return {"grad_norms": {t: {g: round(v / self.n, 6) for g, v in groups.items()}
                               for t, groups in self.sums.items()}, "grad_norm_steps": self.n}


def build_teacher_head(cfg: Config, inter, teacher: dict, frozen, device):
    """The stage-1 model itself, frozen, on its own modal inputs (``stage2.kt_target=content``):
    its content head is the KT target."""
    from safetensors.torch import load_file

    from ptmrec_dist.train.stage1 import build_model

    head = build_model(cfg, inter, frozen)
    head.load_state_dict(load_file(str(teacher["weights"])))
    head.set_modal_inputs({m: t.detach() for m, t in head.item_modal_inputs().items()})
    for p in head.parameters():
        p.requires_grad_(False)
    return head.to(device).eval()


def check_stage2_config(cfg: Config) -> None:
    if not cfg.data.shards:
        raise ConfigError("stage 2 streams items from shards: set data.shards "
                          "(`ptmrec shard`)")
    if cfg.stage2.kt_target == "content" and not cfg.stage2.teacher:
        raise ConfigError("config key 'stage2.kt_target' content reads the teacher's content "
                          "head: set stage2.teacher")
    if cfg.stage2.kt_weight > 0 and not cfg.stage2.teacher:
        raise ConfigError("config key 'stage2.kt_weight' > 0 needs a teacher: set "
                          "stage2.teacher to a stage-1 run folder (or kt_weight=0 for one "
                          "stage)")


def load_teacher(cfg: Config) -> dict | None:
    """The stage-1 run in ``stage2.teacher``: representations, weights, and its config (whose
    recommender must be the one configured here). Representations that are not a finite real
    matrix are an :class:`InputError` naming the file (and the first bad row); whether they
    fit the interactions is :func:`check_stage2_data`'s question."""
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
    # the held-out items must be the same: a teacher that trained on this run's cold items
    # would leak them into stage 2 (and one whose cold items are warm here starts untrained)
    for section, key in (("recommender", "name"), ("recommender", "embedding_dim"),
                         ("recommender", "feat_embed_dim"), ("backbone", "modalities"),
                         ("data", "cold_items"), ("data", "cold_seed")):
        mine = getattr(getattr(cfg, section), key)
        theirs = getattr(getattr(tcfg, section), key)
        if mine != theirs:
            raise ConfigError(f"config key '{section}.{key}' is {mine!r} but the teacher "
                              f"{run} was trained with {theirs!r}")
    users = read_representations(files["users"], "user")
    items = read_representations(files["items"], "item")
    if users.shape[1] != items.shape[1]:
        raise InputError(files["items"], f"{items.shape[1]}-d item representations, but "
                                         f"{files['users']} holds {users.shape[1]}-d users' "
                                         "(scores are user_repr @ item_repr.T)")
    return {"users": torch.from_numpy(users), "items": torch.from_numpy(items),
            "weights": files["weights"], "run": str(run),
            "users_file": files["users"], "items_file": files["items"],
            "data": tcfg.data.path}


def check_stage2_data(cfg: Config, inter, teacher: dict | None) -> None:
    """Before anything is built, stage 2's inputs must fit the interactions ``inter``: the
    teacher's representations (one row per user and per item), the shards' item index
    (``manifest.json``'s ``n_items``), and a valid split to choose the epoch on."""
    from ptmrec_dist.data.interactions import check_valid_split
    from ptmrec_dist.data.shards import load_manifest
    from ptmrec_dist.data.sources import shard_source

    if teacher is not None:
        for key, n in (("users", inter.n_users), ("items", inter.n_items)):
            rows = teacher[key].shape[0]
            if rows != n:
                raise InputError(teacher[f"{key}_file"],
                                 f"the teacher has {rows} {key}, but the interactions "
                                 f"{inter.path} have {n} {key}: stage2.teacher must be a "
                                 "stage-1 run on the same interactions (it was trained on "
                                 f"data.path={teacher['data']})")
    check_valid_split(inter)
    manifest = load_manifest(cfg.data.shards)
    n_shards = manifest.get("n_items")
    recorded = manifest.get("interactions")
    if not isinstance(n_shards, int) or n_shards > inter.n_items \
            or (recorded and n_shards != inter.n_items):
        raise InputError(shard_source(cfg.data.shards).manifest_location,
                         f"the shards index {n_shards} items, but the interactions "
                         f"{inter.path} have {inter.n_items} items: data.shards must be "
                         "written (`ptmrec shard`) for the same item index"
                         + (f" (these were written for {recorded})" if recorded else "")
                         + ("; if the interactions are a subset of a larger catalog, set "
                            "data.catalog to the catalog folder"
                            if isinstance(n_shards, int) and n_shards > inter.n_items else ""))


def build_student(cfg: Config, inter, teacher: dict | None, device):
    """``(student, frozen features)``: the stage-1 recommender on the frozen backbone's
    features, with the teacher's weights (from scratch in one-stage runs). The frozen features
    are also what the knowledge-guided initialisation reads."""
    from ptmrec_dist import rec
    from ptmrec_dist.rec.features import resolve_features
    from ptmrec_dist.train.stage1 import build_model

    check_stage2_data(cfg, inter, teacher)
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
    # the modal inputs become the (untrained) feature bank now, before the optimizer and the
    # parameter counts are built: FREEDOM's and BM3's trained feature tables are parameters
    # in stage 1, and would otherwise sit in the optimizer and inflate the trainable count
    student.set_modal_inputs({m: t.detach() for m, t in student.item_modal_inputs().items()})
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
    why = resolve_checkpointing(backbone, cfg, dist.detect().world_size)
    if why:
        _log.info(why)
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

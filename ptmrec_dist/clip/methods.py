"""The PEFT method registry for stage 2, and the adapted (trainable) backbone.

``AdaptedBackbone`` has the interface of :class:`~ptmrec_dist.clip.backbone.FrozenBackbone`
(``encode_images``, ``encode_texts``, ``processor``, ``tokenizer``, ``max_text_len``), so the
extraction code runs it unchanged. A method's ``apply`` decides what trains:

* ``prompt``: deep prompts in both towers (:mod:`ptmrec_dist.clip.prompts`), ours; with a
  BERT-style ``backbone.text_tower`` the text prompts go into that tower
  (:mod:`ptmrec_dist.clip.text_prompts`) and the vision prompts stay in CLIP's vision tower;
* ``lora`` / ``ia3``: through ``peft`` (``inject_adapter_in_model``), on ``peft.target_modules``;
  left empty (the default), each model gets its family's attention query/value projections
  (:data:`TARGET_MODULES`: CLIP's ``q_proj``/``v_proj``, BERT's ``query``/``value``, ...);
* ``full``: every backbone weight the features depend on (the joint fine-tuning baseline);
* ``frozen``: nothing in the backbone.

With a text tower, CLIP's own text side (text model, text projection) and the tower's pooler
compute nothing the features use: no method adapts or trains them.

Whatever the method, the trainable weights are the parameters with ``requires_grad``; they are
exported alone as safetensors (:func:`save_trainable`) and loaded back onto a fresh backbone with
the same method applied (:func:`load_trainable`, which checks that the file has exactly the
method's trainable names and shapes). A new method is one class plus one registry line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ptmrec_dist import dist
from ptmrec_dist.clip.backbone import FrozenBackbone
from ptmrec_dist.clip.prompts import PromptLearner, text_features, vision_features
from ptmrec_dist.clip.text_prompts import check_prompt_tower, tower_features
from ptmrec_dist.errors import ConfigError, InputError, TrainingError


class AdaptedBackbone(FrozenBackbone):
    """A backbone that a PEFT method makes (partly) trainable. ``prompt_len``/``prompt_depth``
    only matter for the ``prompt`` method."""

    def __init__(self, frozen: FrozenBackbone, use_checkpoint: bool | str = False):
        super().__init__(frozen.clip, frozen.processor, frozen.name_or_path, frozen.text_tower)
        # DeepSpeed rejects 0-dim parameters; the temperature is not used by recommendation
        scale = self.clip.logit_scale.detach().reshape(1)
        del self.clip.logit_scale
        self.clip.register_buffer("logit_scale", scale, persistent=False)
        self.prompts: PromptLearner | None = None
        self.use_checkpoint = use_checkpoint
        self.method = "frozen"

    def _prompts(self):
        return self.prompts() if self.prompts is not None else (None, None)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, vision = self._prompts()
        return vision_features(self.clip, pixel_values.to(self.dtype), vision,
                               self.use_checkpoint)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text, _ = self._prompts()
        if self.text_tower is not None:
            return tower_features(self.text_tower.encoder, input_ids, attention_mask, text,
                                  self.use_checkpoint)
        return text_features(self.clip, input_ids, attention_mask, text, self.use_checkpoint)

    def forward(self, pixel_values, input_ids, attention_mask):
        """``(image [B, d], text [B, d])`` features of a batch of items."""
        return self.encode_images(pixel_values), self.encode_texts(input_ids, attention_mask)


def _set_trainable(module: nn.Module, pred) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(bool(pred(name)))


class Method:
    name = "base"

    def apply(self, backbone: AdaptedBackbone, cfg) -> None:
        """``cfg`` is the whole config (``peft`` and ``stage2`` sections)."""
        raise NotImplementedError


VISION_SIDE = ("clip.vision_model.", "clip.visual_projection.")
CLIP_TEXT_SIDE = ("clip.text_model.", "clip.text_projection.")


def tower_of(name: str) -> str:
    """``text`` or ``vision``: the tower a backbone (or feature-gate) parameter belongs to."""
    vision = (*VISION_SIDE, "prompts.vision", "prompts.couple", "gate_image")
    return "vision" if name.startswith(vision) else "text"


def _unused(backbone: AdaptedBackbone, modalities: str) -> tuple[str, ...]:
    """Name prefixes of the parameters no feature depends on: with a text tower, CLIP's text side
    and the tower's pooler (whose output is never used); the tower of a modality that
    ``backbone.modalities`` leaves out."""
    unused: tuple[str, ...] = ()
    if backbone.text_tower is not None:
        unused += (*CLIP_TEXT_SIDE, "text_tower.encoder.pooler.")
    if modalities == "text":
        unused += VISION_SIDE
    elif modalities == "image":
        unused += (*CLIP_TEXT_SIDE, "text_tower.")
    return unused


def _prompt_towers(backbone: AdaptedBackbone, modalities: str) -> dict[str, object]:
    """``{name: config}`` of the towers that take prompts: CLIP's vision tower, and the text
    tower if there is one, else CLIP's; only those ``backbone.modalities`` reads."""
    towers = {}
    if modalities in ("both", "image"):
        towers["vision"] = backbone.clip.vision_model.config
    if modalities in ("both", "text"):
        if backbone.text_tower is None:
            towers["text"] = backbone.clip.text_model.config
        else:
            check_prompt_tower(backbone.text_tower.encoder)
            towers["text"] = backbone.text_tower.encoder.config
    return towers


class Prompt(Method):
    name = "prompt"

    def apply(self, backbone, cfg):
        s = cfg.stage2
        _set_trainable(backbone, lambda n: False)
        if not (s.prompt_len and s.prompt_depth):
            return
        towers = _prompt_towers(backbone, cfg.backbone.modalities)
        for key, config in towers.items():
            if s.prompt_depth > config.num_hidden_layers:
                raise ConfigError(f"config key 'stage2.prompt_depth' ({s.prompt_depth}) exceeds "
                                  f"the {config.num_hidden_layers} layers of the {key} tower")
        if cfg.peft.coupled and len(towers) < 2:
            raise ConfigError("peft.coupled projects text prompts into the vision tower: it "
                              f"needs both towers (backbone.modalities={cfg.backbone.modalities})")
        widths = {k: c.hidden_size for k, c in towers.items()}
        backbone.prompts = PromptLearner(widths.get("text", 0), widths.get("vision", 0),
                                         s.prompt_len, s.prompt_depth, cfg.peft.coupled,
                                         cfg.peft.prompt_std)
        if "text" in towers and backbone.text_tower is None:   # CLIP's text prompts take
            backbone.max_text_len -= s.prompt_len               # positions of the text


# attention query/value projections per architecture family (``config.model_type``; CLIP's towers
# report clip_vision_model / clip_text_model), checked on transformers 5.x
TARGET_MODULES = {
    "clip": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def family_targets(model: nn.Module) -> list[str]:
    """The default ``peft.target_modules`` of ``model``'s family."""
    kind = getattr(getattr(model, "config", None), "model_type", "?")
    family = kind.removesuffix("_vision_model").removesuffix("_text_model")
    if family not in TARGET_MODULES:
        raise ConfigError(f"config key 'peft.target_modules' is empty and the {kind!r} family "
                          f"has no default (known: {', '.join(TARGET_MODULES)}): set "
                          "peft.target_modules to its attention module names")
    return list(TARGET_MODULES[family])


def _adapter_targets(backbone: AdaptedBackbone, explicit: list[str],
                     modalities: str = "both") -> list[tuple]:
    """``(model, target names)`` to inject into: the CLIPModel, or with a text tower CLIP's vision
    tower and the tower's encoder, each with its family's targets; only the towers
    ``backbone.modalities`` reads. An explicit list applies to them together (a name may match
    on one side only)."""
    text = backbone.clip.text_model if backbone.text_tower is None else \
        backbone.text_tower.encoder
    if modalities == "text":
        parts = [text]
    elif modalities == "image":
        parts = [backbone.clip.vision_model]
    elif backbone.text_tower is None:
        parts = [backbone.clip]
    else:
        parts = [backbone.clip.vision_model, text]
    if explicit:
        model = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
        return [(model, list(explicit))]
    return [(m, family_targets(m)) for m in parts]


class _PeftAdapter(Method):
    marker = ""

    def peft_config(self, cfg, targets: list[str]):
        raise NotImplementedError

    def apply(self, backbone, cfg):
        from peft import inject_adapter_in_model

        for model, targets in _adapter_targets(backbone, cfg.peft.target_modules,
                                               cfg.backbone.modalities):
            try:
                inject_adapter_in_model(self.peft_config(cfg, targets), model)
            except ValueError as exc:
                raise ConfigError(f"config key 'peft.target_modules' {targets}: "
                                  f"{str(exc).splitlines()[0]}") from None
        _set_trainable(backbone, lambda n: self.marker in n)


class Lora(_PeftAdapter):
    name, marker = "lora", "lora_"

    def peft_config(self, cfg, targets):
        from peft import LoraConfig
        p = cfg.peft
        return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                          target_modules=targets)


class IA3(_PeftAdapter):
    name, marker = "ia3", "ia3_"

    def peft_config(self, cfg, targets):
        from peft import IA3Config
        return IA3Config(target_modules=targets, feedforward_modules=[])


class Full(Method):
    name = "full"

    def apply(self, backbone, cfg):
        unused = _unused(backbone, cfg.backbone.modalities)
        _set_trainable(backbone, lambda n: not n.startswith(unused))


class Frozen(Method):
    name = "frozen"

    def apply(self, backbone, cfg):
        _set_trainable(backbone, lambda n: False)


METHODS = {m.name: m for m in (Prompt, Lora, IA3, Full, Frozen)}


def names() -> list[str]:
    return list(METHODS)


def apply_method(frozen: FrozenBackbone, cfg) -> AdaptedBackbone:
    """Wrap ``frozen`` and apply ``cfg.peft.method`` to it (the frozen one is consumed)."""
    name = cfg.peft.method
    if name not in METHODS:
        raise ConfigError(f"config key 'peft.method': unknown method {name!r}; available: "
                          f"{', '.join(names())}")
    # `auto` is decided by the training caller, which knows the micro batch and precision
    # (plan.activations.resolve_checkpointing); until then nothing is recomputed
    ckpt = cfg.stage2.activation_checkpointing
    backbone = AdaptedBackbone(frozen, use_checkpoint=ckpt if ckpt in (True, "mlp") else False)
    METHODS[name]().apply(backbone, cfg)
    backbone.method = name
    return backbone


def param_counts(module: nn.Module) -> dict:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "total": total,
            "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The method's own weights (gathered first under ZeRO-3)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with dist.gathered(list(params.values())):
        state = {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}
    # a ZeRO-3 partition read outside a gather is an empty tensor: never export one
    partial = [n for n, p in params.items()
               if state[n].numel() != getattr(p, "ds_numel", p.numel()) or state[n].numel() == 0]
    if partial:
        raise TrainingError(f"the trainable weights {', '.join(partial[:3])} are empty or "
                            "partial (ZeRO-3 partitions not gathered); nothing was saved")
    return state


def save_trainable(module: nn.Module, path: str | Path, meta: dict,
                   write: bool = True) -> Path:
    """``path`` (safetensors): the trainable weights, with ``meta`` (method, sizes) as JSON
    metadata, written atomically. Every rank must call it (ZeRO-3 gathers); only ranks with
    ``write`` write."""
    from ptmrec_dist.io import atomic_save_safetensors

    state = trainable_state_dict(module)
    if write:
        atomic_save_safetensors(path, state, {"ptmrec": json.dumps(meta)})
    return Path(path)


def load_trainable(module: nn.Module, path: str | Path) -> dict:
    """Load ``save_trainable``'s file onto ``module`` (built with the same method and sizes);
    returns its metadata. Every trainable name must be in the file, with its shape."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such adapter file")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("ptmrec", "{}"))
    except Exception as exc:   # safetensors raises its own error types
        raise InputError(path, f"not a readable safetensors file: {exc}") from None
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise InputError(path, f"weights do not match peft.method={meta.get('method', '?')} here: "
                               f"missing {missing[:3]}, unexpected {extra[:3]} (built with "
                               f"{meta})")
    for n, p in params.items():     # every shape checked before anything is written
        if tuple(state[n].shape) != tuple(p.shape):
            raise InputError(path, f"{n}: shape {tuple(state[n].shape)} in the file, "
                                   f"{tuple(p.shape)} here (built with {meta})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))
    return meta


ADAPTER = "adapter.safetensors"


def same_model(a: str, b: str) -> bool:
    """Two ``backbone.name_or_path`` (or ``text_tower``) values name the same model: equal
    strings, or local folders that resolve to the same place."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return bool(a and b) and pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def recorded_backbone_hash(run: Path) -> str | None:
    """The pretrained backbone's sha256 that the run's newest step checkpoint recorded
    (``state.json``, plain JSON), or None where no checkpoint is left."""
    steps = sorted((run / "checkpoints").glob("step-*/state.json"))
    if not steps:
        return None
    try:
        return json.loads(steps[-1].read_text(encoding="utf-8")).get("backbone_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def load_stage2_encoders(run: str | Path, backbone=None, device: str | torch.device = "cpu"):
    """The tuned encoders of the finished stage-2 run folder ``run``: the backbone its
    ``config.yaml`` names, the run's PEFT method applied with its sizes (``peft``,
    ``stage2.prompt_*``), ``adapter.safetensors`` loaded onto it (:func:`load_trainable`
    checks every name and shape), cast to bf16 if the run trained in bf16 (DeepSpeed cast the
    backbone then, so its features were computed in bf16), in eval mode. Returns ``(backbone,
    the run's config, the adapter's metadata)``.

    ``backbone`` (a ``BackboneConfig``, optional): what the caller configured; a
    ``name_or_path`` or ``text_tower`` other than the run's is an :class:`InputError` naming
    both, because an adapter only means something on the weights it was trained on. Where the
    run's newest step checkpoint recorded the pretrained weights' sha256, the loaded backbone
    must have it (a backbone folder rewritten since the run is refused the same way)."""
    from ptmrec_dist.clip.backbone import load_backbone, weights_hash
    from ptmrec_dist.config import load_config

    run = Path(run)
    for name in ("config.yaml", ADAPTER):
        if not (run / name).is_file():
            raise InputError(run / name, "missing: not a finished `ptmrec stage2` run folder "
                                         "(the adapter is written at its first evaluation)")
    cfg = load_config(run / "config.yaml")
    if backbone is not None:
        for key in ("name_or_path", "text_tower"):
            mine, theirs = getattr(backbone, key), getattr(cfg.backbone, key)
            if mine and not same_model(mine, theirs):
                raise InputError(run / "config.yaml", f"the adapter was trained on "
                                 f"backbone.{key}={theirs!r}, but {mine!r} was given: use the "
                                 "run's backbone (or leave the setting out)",
                                 field=f"backbone.{key}")
    frozen = load_backbone(cfg.backbone)
    recorded = recorded_backbone_hash(run)
    found = weights_hash(frozen) if recorded is not None else None
    if found != recorded:
        raise InputError(cfg.backbone.name_or_path,
                         f"these weights are not the ones the run {run} was trained from "
                         f"(sha256 {found[:12]}..., the run recorded "
                         f"{recorded[:12]}...): the backbone folder was rewritten since",
                         field="backbone.name_or_path")
    adapted = apply_method(frozen, cfg)
    adapted.use_checkpoint = False           # inference: nothing to recompute
    metrics = run / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text(encoding="utf-8")).get("bf16"):
        adapted.to(torch.bfloat16)
    meta = load_trainable(adapted, run / ADAPTER)
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted.to(device).eval(), cfg, meta

"""The PEFT method registry for stage 2, and the adapted (trainable) backbone.

``AdaptedBackbone`` has the interface of :class:`~ptmrec_dist.clip.backbone.FrozenBackbone`
(``encode_images``, ``encode_texts``, ``processor``, ``tokenizer``, ``max_text_len``), so the
extraction code runs it unchanged. A method's ``apply`` decides what trains:

* ``prompt``: deep prompts in both towers (:mod:`ptmrec_dist.clip.prompts`), ours;
* ``lora`` / ``ia3``: through ``peft`` (``inject_adapter_in_model`` on the CLIPModel,
  ``peft.target_modules``, default the attention's ``q_proj``/``v_proj``);
* ``full``: every backbone weight (the joint fine-tuning baseline);
* ``frozen``: nothing in the backbone.

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
from ptmrec_dist.errors import ConfigError, InputError, TrainingError


class AdaptedBackbone(FrozenBackbone):
    """A backbone that a PEFT method makes (partly) trainable. ``prompt_len``/``prompt_depth``
    only matter for the ``prompt`` method."""

    def __init__(self, frozen: FrozenBackbone, use_checkpoint: bool = False):
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
        if self.text_tower is not None:
            return self.text_tower(input_ids, attention_mask)
        text, _ = self._prompts()
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


class Prompt(Method):
    name = "prompt"

    def apply(self, backbone, cfg):
        if backbone.text_tower is not None:
            raise ConfigError("peft.method=prompt puts prompts into CLIP's text tower; it does not "
                              "support backbone.text_tower (use lora or ia3)")
        s = cfg.stage2
        _set_trainable(backbone, lambda n: False)
        if s.prompt_len and s.prompt_depth:
            for tower, key in ((backbone.clip.vision_model, "vision"),
                               (backbone.clip.text_model, "text")):
                layers = tower.config.num_hidden_layers
                if s.prompt_depth > layers:
                    raise ConfigError(f"config key 'stage2.prompt_depth' ({s.prompt_depth}) "
                                      f"exceeds the {layers} layers of the {key} tower")
            c = backbone.clip.config
            backbone.prompts = PromptLearner(c.text_config.hidden_size,
                                             c.vision_config.hidden_size, s.prompt_len,
                                             s.prompt_depth, cfg.peft.coupled, cfg.peft.prompt_std)
            backbone.max_text_len -= s.prompt_len


class _PeftAdapter(Method):
    marker = ""

    def peft_config(self, cfg):
        raise NotImplementedError

    def apply(self, backbone, cfg):
        from peft import inject_adapter_in_model

        target = backbone.clip if backbone.text_tower is None else backbone
        try:
            inject_adapter_in_model(self.peft_config(cfg), target)
        except ValueError as exc:
            raise ConfigError(f"config key 'peft.target_modules' {cfg.peft.target_modules}: "
                              f"{str(exc).splitlines()[0]}") from None
        _set_trainable(backbone, lambda n: self.marker in n)


class Lora(_PeftAdapter):
    name, marker = "lora", "lora_"

    def peft_config(self, cfg):
        from peft import LoraConfig
        p = cfg.peft
        return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                          target_modules=list(p.target_modules))


class IA3(_PeftAdapter):
    name, marker = "ia3", "ia3_"

    def peft_config(self, cfg):
        from peft import IA3Config
        return IA3Config(target_modules=list(cfg.peft.target_modules), feedforward_modules=[])


class Full(Method):
    name = "full"

    def apply(self, backbone, cfg):
        _set_trainable(backbone, lambda n: True)


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
    backbone = AdaptedBackbone(frozen, use_checkpoint=cfg.stage2.activation_checkpointing)
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

"""The stage-2 backbone on the ``meta`` device: real shapes, ``requires_grad`` and adapters,
no memory (docs/plan.md, "Counts are exact")."""

from __future__ import annotations

from pathlib import Path

from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError


def build_meta_backbone(cfg: Config):
    """The stage-2 backbone (``apply_method(FrozenBackbone(...))``) on the meta device: real
    shapes and ``requires_grad``, no memory."""
    import torch
    from transformers import CLIPModel

    from ptmrec_dist.clip.backbone import FrozenBackbone
    from ptmrec_dist.clip.methods import apply_method

    backbone_cfg = cfg.backbone
    if not backbone_cfg.name_or_path:
        raise ConfigError("no backbone: set backbone.name_or_path (a local folder or a hub id) "
                          "to plan stage 2")
    if backbone_cfg.text_tower:
        raise ConfigError("ptmrec plan models CLIP's own text tower; backbone.text_tower "
                          f"({backbone_cfg.text_tower!r}) is not supported by the planner")
    clip_config = _read_clip_config(backbone_cfg.name_or_path)
    # torch's meta device: every tensor made inside (parameters, buffers, the methods' prompts
    # and adapters) gets shapes and no storage
    with torch.device("meta"):
        clip = CLIPModel(clip_config)
        backbone = apply_method(FrozenBackbone(clip, None, backbone_cfg.name_or_path), cfg)
    return backbone


def _read_clip_config(name_or_path: str):
    """``CLIPConfig`` of a local folder or a cached hub id; a ConfigError naming the key."""
    from transformers import CLIPConfig

    try:
        return CLIPConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        path = Path(name_or_path).expanduser()
        if path.exists():
            what = f"cannot read a CLIP config.json in this folder: {str(exc).splitlines()[0]}"
        elif name_or_path.startswith(("/", ".", "~")):
            what = "no such folder"
        else:
            what = (f"not a local folder, and not a hub id in the HF cache: "
                    f"{str(exc).splitlines()[0]}")
        raise ConfigError(f"config key 'backbone.name_or_path' ({name_or_path!r}): "
                          f"{what}") from None

"""Frozen vision-language backbones: a HF ``CLIPModel`` (local folder or hub id through the HF
cache), optionally with a separate BERT-style text tower (mean pooling).

The backbone never trains in stage 1: parameters have ``requires_grad=False`` and the towers stay
in eval mode (dropout off) even when a surrounding module is put in train mode.
``trust_remote_code`` is never used; weights load from safetensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ptmrec_dist.config import BackboneConfig
from ptmrec_dist.errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def weights_hash(module: nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _from_pretrained(cls, name_or_path: str, what: str, weights: bool = False, **kw):
    """``cls.from_pretrained`` without remote code; ``weights``: a model, whose weights load from
    safetensors only (a folder or hub repo with only ``pytorch_model.bin``, a pickle, is refused:
    exit 2)."""
    if weights:
        kw["use_safetensors"] = True
    try:
        return cls.from_pretrained(name_or_path, trust_remote_code=False, **kw)
    except (OSError, ValueError) as exc:
        where = "local folder" if Path(name_or_path).exists() else \
            "hub id (not a local folder; it must be in the HF cache when offline)"
        hint = " (weights load from model.safetensors only, never from a pickle such as " \
            "pytorch_model.bin: convert it with safetensors)" if weights and \
            "safetensors" in str(exc) else ""
        raise InputError(name_or_path, f"cannot load the {what} from this {where}: "
                                       f"{str(exc).splitlines()[0]}{hint}",
                         field="backbone.name_or_path" if what != "text tower"
                         else "backbone.text_tower") from None


class TextTower(nn.Module):
    """A BERT-style encoder with attention-masked mean pooling (sentence-transformers style)."""

    def __init__(self, name_or_path: str, dtype: torch.dtype, attn_implementation: str):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.encoder = _from_pretrained(AutoModel, name_or_path, "text tower", weights=True,
                                        dtype=dtype, attn_implementation=attn_implementation)
        self.tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "text tower")
        self.dim = self.encoder.config.hidden_size
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 512) or 512,
                              self.encoder.config.max_position_embeddings)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class FrozenBackbone(nn.Module):
    def __init__(self, clip, processor, name_or_path: str, text_tower: TextTower | None = None):
        super().__init__()
        self.clip = freeze(clip)
        self.processor = processor
        self.text_tower = freeze(text_tower) if text_tower is not None else None
        self.name_or_path = name_or_path
        vision = clip.config.vision_config
        self.image_size = vision.image_size
        self.image_dim = clip.config.projection_dim
        self.text_dim = text_tower.dim if text_tower is not None else clip.config.projection_dim
        self.max_text_len = text_tower.max_length if text_tower is not None else \
            clip.config.text_config.max_position_embeddings

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.clip.eval()
        if self.text_tower is not None:
            self.text_tower.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The towers' current dtype (DeepSpeed's bf16/fp16 casts the module after loading)."""
        return next(self.clip.parameters()).dtype

    @property
    def tokenizer(self):
        return self.text_tower.tokenizer if self.text_tower is not None else self.processor.tokenizer

    def preprocess_images(self, images) -> torch.Tensor:
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=pixel_values.to(self.dtype))
        return getattr(out, "pooler_output", out)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_tower is not None:
            return self.text_tower(input_ids, attention_mask)
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)

    def weights_hash(self) -> str:
        return weights_hash(self)


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> FrozenBackbone:
    """Load the frozen backbone named by ``backbone.name_or_path`` (+ ``backbone.text_tower``)."""
    from transformers import CLIPModel, CLIPProcessor

    if not cfg.name_or_path:
        raise InputError(None, "no backbone: set backbone.name_or_path (a local folder or a hub "
                               "id), e.g. the one `ptmrec make-backbone` writes")
    dtype = DTYPES[cfg.dtype]
    clip = _from_pretrained(CLIPModel, cfg.name_or_path, "CLIP model", weights=True, dtype=dtype,
                            attn_implementation=cfg.attn_implementation)
    processor = _from_pretrained(CLIPProcessor, cfg.name_or_path, "CLIP processor")
    text = TextTower(cfg.text_tower, dtype, cfg.attn_implementation) if cfg.text_tower else None
    return FrozenBackbone(clip, processor, cfg.name_or_path, text).to(device)

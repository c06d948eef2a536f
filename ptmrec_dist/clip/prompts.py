"""Deep prompts in both CLIP towers, on HF ``CLIPModel`` without forking it.

The towers' own submodules (embeddings, encoder layers, layer norms, projections) are called in
the order HF's ``CLIPTextModel`` / ``CLIPVisionModel`` call them; only the token sequence between
layers is ours. So ZeRO-3's per-module hooks still gather every weight, and with no prompts the
output equals HF's (tested).

* Vision (VPT-deep): ``prompt_len`` tokens are appended after the patch tokens (after
  ``pre_layrnorm``) at the input of layer 1 and *replaced* at the input of each layer up to
  ``prompt_depth``; pooling stays the CLS token at position 0.
* Text (MaPLe/CoOp): ``prompt_len`` tokens go right after the start token, with position
  embeddings of their places (the text behind them moves back by ``prompt_len``; the tokenizer's
  ``max_length`` shrinks by as much so the sequence still fits the position table), and are
  replaced per layer up to ``prompt_depth``. The causal mask is built over the longer sequence
  (prompts see the start token and earlier prompts; text sees all prompts), the padding mask gets
  ones for the prompts, and end-of-text pooling reads the EOT position shifted by ``prompt_len``.
* Coupled (MaPLe): vision prompts are per-layer linear projections of the text prompts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class PromptLearner(nn.Module):
    """Prompt tables ``text [depth, L, text_width]`` and ``vision [depth, L, vision_width]`` (or,
    coupled, the per-layer projections text -> vision). A width of 0 means no prompts in that
    tower (``backbone.modalities`` leaves it out): its side is None. Called as a module
    (``self()``) so that ZeRO-3 gathers its parameters."""

    def __init__(self, text_width: int, vision_width: int, prompt_len: int, depth: int,
                 coupled: bool = False, std: float = 0.02):
        super().__init__()
        if coupled and not (text_width and vision_width):
            raise ValueError("coupled prompts need both towers")
        self.prompt_len, self.depth, self.coupled = prompt_len, depth, coupled
        # the text table is drawn first, as before vision prompts became optional
        self.text = nn.Parameter(torch.randn(depth, prompt_len, text_width) * std) \
            if text_width else None
        self.vision = None
        if coupled:
            self.couple = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(depth))
        elif vision_width:
            self.vision = nn.Parameter(torch.randn(depth, prompt_len, vision_width) * std)

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.coupled:
            vision = torch.stack([proj(self.text[k]) for k, proj in enumerate(self.couple)])
        else:
            vision = self.vision
        return self.text, vision

    @torch.no_grad()
    def init_from(self, text: torch.Tensor | None, vision: torch.Tensor | None) -> None:
        """Set every layer's prompts to ``text [L, text_width]`` / ``vision [L, vision_width]``
        (knowledge-guided initialisation; coupled prompts take only the text side)."""
        if text is not None and self.text is not None:
            self.text.copy_(text.to(self.text.dtype).expand_as(self.text))
        if vision is not None and self.vision is not None and not self.coupled:
            self.vision.copy_(vision.to(self.vision.dtype).expand_as(self.vision))


def _mlp_site(layer: nn.Module) -> tuple[object, str] | None:
    """Where a layer's MLP is called: ``(owner, attribute)`` to wrap for ``"mlp"``
    checkpointing (CLIP's ``mlp`` module; a BERT-style layer's ``feed_forward_chunk``:
    intermediate + output), or None where the layer has neither."""
    if isinstance(getattr(layer, "mlp", None), nn.Module):
        return layer.mlp, "forward"
    if callable(getattr(layer, "feed_forward_chunk", None)):
        return layer, "feed_forward_chunk"
    return None


def _layer(layer: nn.Module, h: torch.Tensor, mask, use_checkpoint: bool | str,
           **kw) -> torch.Tensor:
    """One encoder layer. ``use_checkpoint`` (while gradients are on): True recomputes the
    whole layer in backward; ``"mlp"`` only its MLP (the fc1 and activation outputs, 4-8x the
    width per token, are not kept; attention's are), where the layer has one, else the whole
    layer."""
    if use_checkpoint and torch.is_grad_enabled():
        site = _mlp_site(layer) if use_checkpoint == "mlp" else None
        if site is None:
            return checkpoint(layer, h, mask, use_reentrant=False, **kw)
        owner, name = site
        plain = getattr(owner, name)           # the bound method (recomputed in backward)
        setattr(owner, name, lambda *a: checkpoint(plain, *a, use_reentrant=False))
        try:
            return layer(h, mask, **kw)
        finally:
            delattr(owner, name)               # the class's method again
    return layer(h, mask, **kw)


def vision_features(clip, pixel_values: torch.Tensor, prompts: torch.Tensor | None,
                    use_checkpoint: bool | str = False) -> torch.Tensor:
    """Projected image features ``[B, projection_dim]``; ``prompts [depth, L, width]`` or None."""
    vm = clip.vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixel_values))
    depth = 0 if prompts is None else prompts.shape[0]
    n = 0 if prompts is None else prompts.shape[1]
    for k, layer in enumerate(vm.encoder.layers):
        if k < depth and n:
            p = prompts[k].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h if k == 0 else h[:, :-n], p], dim=1)
        h = _layer(layer, h, None, use_checkpoint)
    return clip.visual_projection(vm.post_layernorm(h[:, 0]))


def _eot_positions(text_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Where HF's CLIPTextModel pools (same rule, including its legacy ``eos_token_id == 2``)."""
    ids = input_ids.to(torch.int)
    if text_model.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == text_model.eos_token_id).int().argmax(dim=-1)


def text_features(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  prompts: torch.Tensor | None, use_checkpoint: bool | str = False) -> torch.Tensor:
    """Projected text features ``[B, projection_dim]``; ``prompts [depth, L, width]`` or None."""
    from transformers.masking_utils import create_causal_mask

    tm = clip.text_model
    emb = tm.embeddings
    depth = 0 if prompts is None else prompts.shape[0]
    n = prompts.shape[1] if depth else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens = emb.token_embedding(input_ids)
    if n:
        b = tokens.shape[0]
        p = prompts[0].to(tokens.dtype).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([tokens[:, :1], p, tokens[:, 1:]], dim=1)
        attention_mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(b, n),
                                    attention_mask[:, 1:]], dim=1)
    length = tokens.shape[1]
    limit = emb.position_embedding.num_embeddings
    if length > limit:
        raise ValueError(f"text of {length - n} tokens + {n} prompts exceeds the "
                         f"{limit} positions of the text tower; tokenize with max_length "
                         f"{limit - n}")
    h = tokens + emb.position_embedding(emb.position_ids[:, :length])
    mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=attention_mask,
                              cache=None)
    for k, layer in enumerate(tm.encoder.layers):
        if 0 < k < depth and n:
            p = prompts[k].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], p, h[:, 1 + n:]], dim=1)
        h = _layer(layer, h, mask, use_checkpoint, is_causal=True)
    h = tm.final_layer_norm(h)
    pos = _eot_positions(tm, input_ids).to(h.device) + n
    return clip.text_projection(h[torch.arange(h.shape[0], device=h.device), pos])


# --------------------------------------------------------------------------- knowledge-guided init

def teacher_directions(features: np.ndarray, teacher_items: np.ndarray, k: int,
                       ridge: float = 1.0) -> np.ndarray:
    """The ``k`` directions of feature space that the stage-1 teacher's item representations
    load on most: a ridge map ``features -> teacher_items`` (``[D, d]``), then its top-``k`` left
    singular vectors (``[k, D]``, unit norm), strongest first."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    y = np.asarray(teacher_items, dtype=np.float64)
    y = y - y.mean(0)
    gram = x.T @ x
    w = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), x.T @ y)
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    dirs = u[:, :k].T
    if len(dirs) < k:   # fewer teacher dimensions than prompts: repeat the strongest
        dirs = np.concatenate([dirs] * (-(-k // len(dirs))))[:k]
    return dirs


def to_width(directions: np.ndarray, projection: torch.Tensor, scale: float) -> torch.Tensor:
    """Feature-space directions ``[k, proj]`` -> the tower's width space through the
    pseudo-inverse of its projection (``weight [proj, width]``), each scaled to norm ``scale``."""
    pinv = torch.linalg.pinv(projection.detach().double().cpu())      # [width, proj]
    v = torch.from_numpy(directions).double() @ pinv.T                 # [k, width]
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
    return v.float()

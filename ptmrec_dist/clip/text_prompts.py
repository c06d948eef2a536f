"""Deep prompts in a BERT-style text tower (``backbone.text_tower``), on the HF model without
forking it.

As in :mod:`ptmrec_dist.clip.prompts`, the encoder's own submodules (the embeddings module, then
each layer of ``encoder.layer``) are called in the order HF calls them; only the token sequence
between layers is ours, so ZeRO-3's per-module hooks still gather every weight. The pooler is not
called: the features are the mean over tokens, as :class:`~ptmrec_dist.clip.backbone.TextTower`
(sentence-transformers) pools.

* ``prompt_len`` learned tokens go right after the first ([CLS]) token at the input of layer 1,
  i.e. after the embeddings module (word + position + token-type embeddings, its LayerNorm), and
  are *replaced* at the input of each layer up to ``prompt_depth`` (VPT-deep).
* Prompts carry no position embedding (as VPT-deep's in the vision tower): the text tokens keep
  their own positions, so no position is taken from the text and the tokenizer's ``max_length``
  does not shrink (unlike CLIP's text tower, where prompts take positions).
* The padding mask gets ones for the prompts (every token attends to them; they attend to every
  real token), built by HF's own ``create_bidirectional_mask`` for the configured attention
  (sdpa, eager, flash).
* Pooling is the attention-masked mean over the real text tokens only (prompts excluded), so
  without prompts the features equal ``TextTower.forward`` (tested).

Families whose model is ``embeddings`` + ``encoder.layer`` with BERT's layer call are supported
(:data:`PROMPT_FAMILIES`); others (DistilBERT, MPNet, ...) run HF's own forward and take no prompts.
"""

from __future__ import annotations

import torch

from ptmrec_dist.clip.prompts import _layer
from ptmrec_dist.errors import ConfigError

# model_type -> same module layout and layer call as BertModel (checked on transformers 5.x)
PROMPT_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert")


def takes_prompts(encoder) -> bool:
    config = encoder.config
    return config.model_type in PROMPT_FAMILIES and not getattr(config, "is_decoder", False)


def check_prompt_tower(encoder) -> None:
    """ConfigError unless deep prompts can go into this text tower."""
    if not takes_prompts(encoder):
        raise ConfigError(f"peft.method=prompt: backbone.text_tower is a "
                          f"{encoder.config.model_type!r} model; deep prompts support the "
                          f"encoder families {', '.join(PROMPT_FAMILIES)} (use lora or ia3)")


def init_space(encoder) -> tuple[torch.Tensor, float]:
    """``(projection, scale)`` for the knowledge-guided init: the pooled feature lives in the
    hidden space itself (identity projection); prompts sit among post-LayerNorm tokens, so they
    are scaled like them, by the norm of the embeddings' LayerNorm gain (as the vision side)."""
    hidden = encoder.config.hidden_size
    return torch.eye(hidden), float(encoder.embeddings.LayerNorm.weight.norm())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``TextTower``'s pooling: the mean over the tokens the mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _with_prompts(h: torch.Tensor, p: torch.Tensor, drop: int) -> torch.Tensor:
    """``h`` with ``p [L, width]`` right after the first token, replacing ``drop`` tokens there."""
    p = p.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
    return torch.cat([h[:, :1], p, h[:, 1 + drop:]], dim=1)


def tower_features(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   prompts: torch.Tensor | None,
                   use_checkpoint: bool | str = False) -> torch.Tensor:
    """Mean-pooled text features ``[B, hidden]``; ``prompts [depth, L, hidden]`` or None."""
    from transformers.masking_utils import create_bidirectional_mask

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not takes_prompts(encoder):        # HF's own forward, without prompts
        if prompts is not None and prompts.numel():
            check_prompt_tower(encoder)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)
    depth = 0 if prompts is None else prompts.shape[0]
    n = prompts.shape[1] if depth else 0
    h = encoder.embeddings(input_ids=input_ids)
    mask = attention_mask
    if n:
        h = _with_prompts(h, prompts[0], 0)
        mask = torch.cat([mask[:, :1], mask.new_ones(mask.shape[0], n), mask[:, 1:]], dim=1)
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=h, attention_mask=mask)
    for k, layer in enumerate(encoder.encoder.layer):
        if 0 < k < depth and n:
            h = _with_prompts(h, prompts[k], n)
        h = _layer(layer, h, mask, use_checkpoint)
    if n:
        h = torch.cat([h[:, :1], h[:, 1 + n:]], dim=1)
    return mean_pool(h, attention_mask)

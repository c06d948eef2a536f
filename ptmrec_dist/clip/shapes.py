"""Named CLIP shapes (OpenAI's ViT-B/32, B/16, L/14) and their forward FLOPs.

Used to build randomly initialised models of a real size for benchmarks and memory planning,
without downloading weights.
"""

from __future__ import annotations

SHAPES = {
    # vision: width, layers, heads, image, patch; text: width, layers, heads; projection
    "vit-b32": dict(v=(768, 12, 12, 224, 32), t=(512, 12, 8), proj=512),
    "vit-b16": dict(v=(768, 12, 12, 224, 16), t=(512, 12, 8), proj=512),
    "vit-l14": dict(v=(1024, 24, 16, 224, 14), t=(768, 12, 12), proj=768),
}


def clip_config(shape: str, vocab_size: int = 49408, max_text_len: int = 77, tokenizer=None):
    """A ``CLIPConfig`` of ``shape``; with a ``tokenizer`` its vocabulary and special tokens
    (the text tower pools at the end-of-text token, so its id must match)."""
    from transformers import CLIPConfig

    s = SHAPES[shape]
    vw, vl, vh, image, patch = s["v"]
    tw, tl, th = s["t"]
    special = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(
        vision_config=dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh,
                           intermediate_size=4 * vw, image_size=image, patch_size=patch),
        text_config=dict(hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th,
                         intermediate_size=4 * tw, vocab_size=vocab_size,
                         max_position_embeddings=max_text_len, **special),
        projection_dim=s["proj"])


def image_tower_flops(vision_config, projection_dim: int) -> int:
    """Forward multiply-add FLOPs (x2) of one image through a ViT tower with projection.

    Per layer and token: QKV + output projections 8 d^2, MLP 16 d^2 (4x width); attention
    scores and weighted sum 4 T d per token. Plus the patch embedding and the projection.
    """
    d, n_layers = vision_config.hidden_size, vision_config.num_hidden_layers
    mlp = vision_config.intermediate_size
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = patches + 1
    per_layer = tokens * (8 * d * d + 4 * d * mlp) + 4 * tokens * tokens * d
    patch_embed = 2 * patches * 3 * vision_config.patch_size ** 2 * d
    return n_layers * per_layer + patch_embed + 2 * d * projection_dim

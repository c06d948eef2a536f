"""A tiny random CLIP (model + processor + byte-level tokenizer) saved like a real one."""

from pathlib import Path

import torch

from ptmrec_dist.clip.tokenizer import bytes_to_unicode


def save_tiny_clip(out: Path, image_size: int = 32, width: int = 32, projection: int = 16,
                   seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, \
        CLIPTokenizer
    base = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(base + [b + "</w>" for b in base] +
                                        ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok)
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * width, vocab_size=len(vocab),
                         max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=2 * width, image_size=image_size, patch_size=8),
        projection_dim=projection)
    CLIPModel(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out

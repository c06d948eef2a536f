"""``torch.compile`` of a backbone's encoder layers (``stage2.compile``, bench/stage2_cost.py)."""

from __future__ import annotations


def compile_layers(backbone, **options) -> int:
    """``torch.compile`` every encoder layer of both towers in place, vision then text, with
    ``nn.Module.compile(**options)`` (default: torch's defaults). The module tree, and so the
    code path of the prompts, stays the same; compilation is lazy (it, and its errors, come at
    the first forward). Returns the number of layers compiled."""
    clip = backbone.clip
    n = 0
    for tower in (clip.vision_model, clip.text_model):
        for layer in tower.encoder.layers:
            layer.compile(**options)
            n += 1
    return n

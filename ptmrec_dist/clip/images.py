"""The demo backbone's images: CLIP's image processor, images loaded once as uint8, and the
processor's normalisation as a lookup table (bit-identical to ``processor(images=...)``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ptmrec_dist.data.catalog import ImageTooLarge, open_image
from ptmrec_dist.errors import InputError


def build_image_processor(image_size: int):
    """CLIP's image processor (PIL backend; resize shorter side, centre crop, CLIP mean/std)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def normalisation_table(image_processor) -> torch.Tensor:
    """(3, 256) float32: pixel_values of each uint8 value per channel, computed with the
    processor's own arithmetic (rescale in float64 then cast to float32, then
    ``(x - mean) / std`` in float32), so a lookup equals what the processor gives bit for bit."""
    v = np.arange(256, dtype=np.float64)
    x = (v * image_processor.rescale_factor).astype(np.float32) if image_processor.do_rescale \
        else v.astype(np.float32)
    if not image_processor.do_normalize:
        return torch.from_numpy(np.stack([x] * 3))
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    return torch.from_numpy(((x[None, :] - mean[:, None]) / std[:, None]).astype(np.float32))


def normalise_images(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 pixel_values, via :func:`normalisation_table`."""
    idx = images.long() + torch.arange(3).view(1, 3, 1, 1) * 256
    return table.reshape(-1)[idx]


def load_images(paths: list[Path], image_processor, size: int) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, size, size). Images that are not already RGB
    ``size`` x ``size`` go once through the processor's own RGB conversion (transparency onto
    white), resize and centre crop, so the result is what the processor would feed the model.
    An image over ``catalog.MAX_IMAGE_PIXELS`` is refused from its header, undecoded."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with open_image(path) as img:
                img.load()
                if img.mode == "RGB" and img.size == (size, size):
                    arr = np.asarray(img).transpose(2, 0, 1)
                else:
                    pv = image_processor(img, do_rescale=False, do_normalize=False,
                                         return_tensors="np")["pixel_values"][0]
                    arr = np.clip(np.rint(pv), 0, 255).astype(np.uint8)
        except FileNotFoundError:
            raise InputError(path, "image file not found") from None
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            raise InputError(path, str(exc)) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise InputError(path, f"undecodable image ({exc})") from None
        out[i] = torch.from_numpy(np.ascontiguousarray(arr))
    return out

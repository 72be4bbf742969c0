"""The reference portrait: read it as users' files come, size it, and prepare it for the VAE and CLIP.

Reading (:func:`load_reference_image`), for every file format Pillow opens:

* the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways
  with a rotation tag comes out upright, as every viewer shows it;
* 16-bit greyscale (``I;16``, ``I;16B``, ``I``) is scaled to 8 bits (``round(v / 257)``: 65535 -> 255)
  instead of being clipped to white; 32-bit float greyscale (``F``) is taken as 0..1 when its maximum is
  <= 1, else as 0..255;
* transparency (RGBA, LA, palette images with a transparent colour) is composited onto
  :data:`REFERENCE_BACKGROUND` (white), so colours hidden under alpha 0 never show;
* the file is decoded completely, so a truncated or corrupt file fails here, before any model runs.

Sizing (:func:`reference_size`): the released rule, longer side ``max_size`` then both sides rounded up
to multiples of 16. CLIP (:func:`clip_preprocess`, :func:`encode_clip_image`): Wan feeds the whole image
bicubic-resized to 224 x 224 (no crop) and takes the penultimate hidden states (SPEC.md section 3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD

__all__ = [
    "REFERENCE_BACKGROUND",
    "SIZE_MULTIPLE",
    "ImageReadError",
    "load_reference_image",
    "reference_size",
    "resize_reference",
    "clip_preprocess",
    "encode_clip_image",
]

#: RGB colour that transparent parts of a reference image are composited onto
REFERENCE_BACKGROUND = (255, 255, 255)
#: size multiple of both output sides (VAE 8x times the transformer's 2x2 patches)
SIZE_MULTIPLE = 16


class ImageReadError(ValueError):
    """A reference image that cannot be opened or decoded (the message names the file and the reason)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for 16-bit, float and transparent images)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, REFERENCE_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_reference_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """The reference portrait as an upright 8-bit RGB PIL image.

    Args:
        source: an image file path (PNG, JPEG, WebP, ... anything Pillow reads), a PIL image, or a uint8
            array ``[H, W, 3]`` (RGB) / ``[H, W, 4]`` (RGBA).

    Returns:
        ``PIL.Image`` in mode ``"RGB"``, EXIF orientation applied, transparency composited onto
        :data:`REFERENCE_BACKGROUND`, 16-bit and float greyscale scaled to 8 bits.

    Raises:
        ImageReadError: the file does not exist, is not an image, or is truncated / corrupt.
        ValueError: an array of another shape or dtype.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4):
            raise ValueError(f"image array must be uint8 [H, W, 3] or [H, W, 4], got {source.dtype} {source.shape}")
        return _to_rgb(Image.fromarray(source))
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file. Check the path.")
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: a truncated file fails here
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image Pillow can read (PNG, JPEG, WebP, ...).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot be decoded ({exc}); the file looks truncated or corrupt.") from exc


def reference_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Output ``(width, height)`` in pixels for a reference of ``width x height`` pixels (SPEC.md section 1).

    Released rule (``infer.py``): scale so the longer side is ``max_size`` (``int`` truncation), then round
    each side **up** to a multiple of 16.

    Raises:
        ValueError: non-positive sizes or ``max_size < 16``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"reference image size must be positive, got {width}x{height}")
    if max_size < SIZE_MULTIPLE:
        raise ValueError(f"max_size must be >= {SIZE_MULTIPLE} pixels, got {max_size}")
    scale = max_size / max(width, height)
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return (-(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def resize_reference(image: Image.Image, max_size: int) -> tuple[Image.Image, torch.Tensor]:
    """Resize to :func:`reference_size` (Lanczos, as the released script) and make the VAE input.

    Returns:
        ``(resized RGB image, pixels [1, 3, H, W] float32 in [-1, 1])``.
    """
    width, height = reference_size(*image.size, max_size)
    resized = image.convert("RGB").resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return resized, pixels


def encode_clip_image(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Wan's image features: the hidden states after all blocks but the last (``hidden_states[-2]``).

    Args:
        model: a ``CLIPVisionModel`` (see :func:`load_clip_vision`).
        pixel_values: [B, 3, S, S] float, already resized and normalised (:func:`clip_preprocess`);
            S = the model's image size (224 -> 257 tokens).

    Returns:
        [B, (S/p)^2 + 1, C] in the model's dtype (Wan2.1: [B, 257, 1280]); no final LayerNorm applied
        (wan/modules/clip.py ``VisionTransformer.forward(use_31_block=True)``).
    """
    dtype = next(model.parameters()).dtype
    out = model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
    return out.hidden_states[-2]


def _images_to_float(images: Any) -> torch.Tensor:
    """PIL image(s) / uint8 HWC array(s) / CHW tensor(s) -> [B, 3, H, W] float32 in [0, 1]."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = np.array(images.convert("RGB"))
    if isinstance(images, Sequence) and not isinstance(images, (torch.Tensor, np.ndarray)):
        if not images:
            raise ValueError("clip_preprocess: got an empty list of images.")
        parts = [_images_to_float(im) for im in images]
        if len({tuple(p.shape[-2:]) for p in parts}) > 1:
            raise ValueError(
                f"clip_preprocess: the images have different sizes {[tuple(p.shape[-2:]) for p in parts]}; "
                "preprocess them one at a time."
            )
        return torch.cat(parts)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"clip_preprocess: numpy images must be uint8 HWC / BHWC RGB, got {images.dtype}.")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"clip_preprocess: numpy images must be [H, W, 3] or [B, H, W, 3], got {images.shape}.")
        return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"clip_preprocess: tensors must be [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}.")
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if not x.is_floating_point():
            raise ValueError(f"clip_preprocess: tensor dtype must be uint8 or float in [0, 1], got {x.dtype}.")
        return x.float()
    raise TypeError(f"clip_preprocess: unsupported image type {type(images).__name__}.")


def clip_preprocess(images: Any, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """Wan's CLIP preprocessing: the whole image resized to ``size`` x ``size`` (bicubic, no crop), normalised.

    Reproduces ``CLIPModel.visual`` of wan/modules/clip.py: ``F.interpolate(mode="bicubic",
    align_corners=False)`` (torch bicubic, no antialiasing, aspect ratio not kept, no clamping), then
    ``(x - CLIP_MEAN) / CLIP_STD`` per channel. (Wan interpolates x in [-1, 1] and maps to [0, 1] afterwards;
    interpolation is linear, so resizing the [0, 1] image is the same up to float rounding.)

    Args:
        images: one of: a PIL image or a list of PIL images (converted to RGB); a uint8 RGB numpy array
            [H, W, 3] or [B, H, W, 3] (channels last); a torch tensor [3, H, W] or [B, 3, H, W] (channels
            first), uint8 in 0..255 or float in [0, 1]. A list must hold images of one size.
        size: output side in pixels (224 for ViT-H/14).

    Returns:
        [B, 3, size, size] float32, normalised (roughly zero-mean, unit-variance per channel).
    """
    x = _images_to_float(images)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


"""Untrusted image bytes become RGB images, or a reason they are skipped.

The one decoding stage of rayclust: the embed job's views (``features``) and the image
model's training and inference views (``views``) both decode here, with PIL, never by
unpickling anything. Decoded views leave their CPU task as uint8 pixels, the smallest form
that crosses the object store without loss; the consumer normalises them.
"""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class BadSample(Exception):
    """A sample that is skipped and recorded, never a reason to fail the job."""


def decode_image(data: bytes) -> Image.Image:
    """RGB image from untrusted bytes, or BadSample saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample(f"image too large: {width}x{height} pixels")
            image.load()
            return image.convert("RGB")
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:  # Image.open checks first
        raise BadSample(f"image too large: {exn}") from None
    except UnidentifiedImageError:
        raise BadSample("not an image: PIL cannot identify the format") from None
    except Exception as exn:  # PIL raises many types on hostile input; all mean "not an image"
        raise BadSample(f"undecodable image: {type(exn).__name__}: {exn}") from None


def normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] as float32 inputs normalised per channel (on their device)."""
    mean_t = torch.tensor(mean, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t


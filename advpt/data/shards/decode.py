"""Image bytes from a shard as a uint8 tensor: the decoding both readers share."""

from __future__ import annotations

import io
import math

import torch

DRAFT_MIN_FACTOR = 4  # reduced-size JPEG decoding from 1/4 scale on (benchmarks/loader.py)


def decode_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """Image bytes as a uint8 tensor ``[3, H, W]``.

    JPEG: ``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a tensor), or Pillow with
    ``draft()``, which decodes at 1/4 or 1/8 scale in the DCT domain, when the reduced image keeps its
    short side ``>= min_side`` (at 1/2 scale Pillow is no faster than decode_jpeg at full size: the
    entropy decoding, which scaling does not shorten, dominates). PNG and WebP:
    ``torchvision.io.decode_image``; anything else Pillow can read, via Pillow.
    """
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io import decode_image as tv_decode

    head = data[:3]
    if head == b"\xff\xd8\xff":
        if min_side:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            factor = 8
            while factor >= DRAFT_MIN_FACTOR and min(width, height) // factor < min_side:
                factor //= 2
            if factor >= DRAFT_MIN_FACTOR:
                image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
                return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # a JPEG libjpeg-turbo refuses in this mode: Pillow decides
            pass
    elif head in (b"\x89PN", b"RIF"):
        try:
            return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)

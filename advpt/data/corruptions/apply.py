"""``corrupt()``: apply one named corruption at one severity to a torch image or batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from advpt.data.corruptions.blur import _defocus_blur, _glass_blur, _motion_blur_c, _zoom_blur
from advpt.data.corruptions.digital import (
    _brightness,
    _contrast,
    _elastic_transform,
    _jpeg_compression,
    _pixelate,
)
from advpt.data.corruptions.noise import _gaussian_noise, _impulse_noise, _shot_noise
from advpt.data.corruptions.tables import CORRUPTIONS, PARAMS, SEVERITIES
from advpt.data.corruptions.weather import _fog, _frost, _snow

_FUNCS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_c,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def _check(name: str, severity: int) -> None:
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; accepted: {', '.join(CORRUPTIONS)}")
    if (
        isinstance(severity, bool)
        or not isinstance(severity, (int, np.integer))
        or severity not in SEVERITIES
    ):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def corrupt(
    image: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a float image [3,H,W] or batch [B,3,H,W] in [0,1].

    Returns a tensor of the same shape, dtype and device, clipped to [0,1]. Randomness comes from
    ``generator`` (torch's default generator when None); each image of a batch draws its own noise.
    """
    _check(name, severity)
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise ValueError(
            f"expected a floating-point torch.Tensor, got {getattr(image, 'dtype', type(image))}"
        )
    if image.dim() == 4:
        if image.shape[0] == 0:
            return image.clone()
        return torch.stack([corrupt(im, name, severity, generator) for im in image])
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3,H,W] or [B,3,H,W], got {tuple(image.shape)}")
    # one 63-bit draw from the torch generator seeds all numpy randomness of this image
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=gen_device))
    rng = np.random.default_rng(seed)
    x = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy().copy()
    out = _FUNCS[name](x, PARAMS[name][severity - 1], rng)
    out = np.clip(out, 0.0, 1.0).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=image.device, dtype=image.dtype)

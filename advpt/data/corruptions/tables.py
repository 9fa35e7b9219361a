"""The corruption names, the severities and the CIFAR-10-C parameter tables (severity 1..5)."""

from __future__ import annotations

from typing import Any

import numpy as np

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# ----------------------------------------------------------------------------------------------------
# CIFAR-10-C parameter tables, copied verbatim from make_cifar_c.py (severity 1..5).
# ----------------------------------------------------------------------------------------------------
_IMSIZE = 32  # elastic_transform's table is written in units of the CIFAR image size
PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt & pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": tuple(np.arange(1, 1 + s, 0.01) for s in (0.06, 0.11, 0.16, 0.21, 0.26)),  # zoom factors
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),  # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, fractal wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor around the channel mean
    "elastic_transform": (
        (_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08),
        (_IMSIZE * 0.05, _IMSIZE * 0.2, _IMSIZE * 0.07),
        (_IMSIZE * 0.08, _IMSIZE * 0.06, _IMSIZE * 0.06),
        (_IMSIZE * 0.1, _IMSIZE * 0.04, _IMSIZE * 0.05),
        (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03),
    ),  # displacement alpha, displacement smoothing sigma, affine jitter
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}

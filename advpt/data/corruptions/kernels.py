"""Resampling kernels shared by several corruptions: the clipped centre zoom and ImageMagick's motion blur.

Images are float HxW or HxWxC numpy arrays in [0, 1].
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=512)
def _zoom_operator(n: int, zoom_factor: float) -> np.ndarray:
    """n x n matrix of the original's 1-D clipped zoom: crop the centre, bilinear-zoom, trim back to n.

    Reproduces ``scipy.ndimage.zoom(order=1)`` (output length ``round(c * z)``, corners aligned) exactly,
    but as a cached matrix: zoom blur needs up to 26 zooms per image and matmuls are ~10x faster.
    """
    c = int(np.ceil(n / zoom_factor))
    top = (n - c) // 2
    n_out = int(round(c * zoom_factor))
    pos = np.arange(n_out) * ((c - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, c - 1)
    hi = np.minimum(lo + 1, c - 1)
    frac = pos - lo
    zoom = np.zeros((n_out, c))
    np.add.at(zoom, (np.arange(n_out), lo), 1 - frac)
    np.add.at(zoom, (np.arange(n_out), hi), frac)
    trim = (n_out - n) // 2
    op = np.zeros((n, n))
    op[:, top : top + c] = zoom[trim : trim + n]
    op.setflags(write=False)
    return op


def _clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom into the centre by ``zoom_factor`` (bilinear) and crop back to the input size (HxW or HxWxC)."""
    rows = _zoom_operator(img.shape[0], float(zoom_factor))
    cols = _zoom_operator(img.shape[1], float(zoom_factor))
    if img.ndim == 2:
        return rows @ img @ cols.T
    return (rows @ img.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0)


def _motion_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick ``MotionBlurImage``: one-sided Gaussian line kernel along ``angle`` (degrees), edges replicated."""
    width = int(2 * np.ceil(radius) + 1)  # GetOptimalKernelWidth1D for radius > 0
    kernel = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    kernel /= kernel.sum()
    steps = np.arange(width)
    off_x = np.ceil(steps * np.cos(np.deg2rad(angle)) - 0.5).astype(int)
    off_y = np.ceil(steps * np.sin(np.deg2rad(angle)) - 0.5).astype(int)
    h, w = img.shape[:2]
    pad = width
    padded = np.pad(img, [(pad, pad), (pad, pad)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    out = np.zeros_like(img, dtype=np.float64)
    for k, dy, dx in zip(kernel, off_y, off_x, strict=True):
        out += k * padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return out

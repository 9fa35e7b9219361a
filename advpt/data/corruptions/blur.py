"""Blur corruptions: defocus, glass, motion and zoom blur.

Each is f(x HxWx3 float64 in [0,1], parameters, rng) -> HxWx3, clipped by the caller.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from advpt.data.corruptions.kernels import _clipped_zoom, _motion_blur


def _gaussian(img: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(multichannel=True): spatial blur only, per channel."""
    sig = (sigma, sigma) + (0,) * (img.ndim - 2)
    return ndimage.gaussian_filter(img, sig, mode=mode, truncate=truncate)


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = c
    half = 8 if radius <= 8 else int(np.ceil(radius))
    ax = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(ax, ax)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # cv2.GaussianBlur(ksize=3 or 5, sigma=alias_blur) with BORDER_REFLECT_101 to anti-alias the disk
    ksize = 3 if radius <= 8 else 5
    g = np.exp(-((np.arange(ksize) - ksize // 2) ** 2) / (2.0 * alias_blur**2))
    g /= g.sum()
    kernel = ndimage.correlate1d(
        ndimage.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror"
    )
    # drop all-zero borders of the 17x17 kernel: exact, and ~10x cheaper on small images
    rows, cols = np.nonzero(kernel.any(axis=1))[0], np.nonzero(kernel.any(axis=0))[0]
    kernel = kernel[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # cv2.filter2D default border is BORDER_REFLECT_101 == scipy 'mirror'
    return np.stack([ndimage.correlate(x[..., d], kernel, mode="mirror") for d in range(x.shape[2])], axis=-1)


def _local_shuffle(x: np.ndarray, offsets: np.ndarray, delta: int) -> np.ndarray:
    """One pass of the original glass-blur pixel loop, vectorised; ``offsets`` is (2, nh, nw) of (dx, dy).

    The original visits h in range(H - delta, delta, -1) (same for w) and does ``x[h, w] = x[h + dy, w + dx]``
    (its tuple swap of numpy views degenerates to this copy). With offsets in [-delta, delta) and delta == 1
    every source is still unvisited when read, so the sequential loop equals this gather.
    """
    h, w = x.shape[:2]
    hh, ww = np.meshgrid(np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1), indexing="ij")
    x = x.copy()
    x[hh, ww] = x[hh + offsets[1], ww + offsets[0]]
    return x


def _glass_blur(x: np.ndarray, c: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = c
    x = _gaussian(x, sigma)
    h, w = x.shape[:2]
    n_h, n_w = len(range(h - delta, delta, -1)), len(range(w - delta, delta, -1))
    for _ in range(iterations):
        x = _local_shuffle(x, rng.integers(-delta, delta, size=(2, n_h, n_w)), delta)
    return _gaussian(x, sigma)


def _motion_blur_c(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    return _motion_blur(x, radius=c[0], sigma=c[1], angle=rng.uniform(-45, 45))


def _zoom_blur(x: np.ndarray, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(x)
    for zoom_factor in c:
        out += _clipped_zoom(x, zoom_factor)
    return (x + out) / (len(c) + 1)

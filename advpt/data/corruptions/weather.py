"""Weather corruptions: snow, frost and fog, and the plasma fractal that frost and fog are made of.

Each is f(x HxWx3 float64 in [0,1], parameters, rng) -> HxWx3, clipped by the caller.
"""

from __future__ import annotations

import numpy as np

from advpt.data.corruptions.kernels import _clipped_zoom, _motion_blur


def _plasma_fractal(rng: np.random.Generator, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height map in [0, 1] of side ``mapsize`` (a power of two); port of the original."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        # the original's wibble * U(-wibble, wibble) (quadratic in wibble) is kept on purpose
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: centre of each square = mean of its corners + wibble
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = corners + np.roll(corners, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds: edge midpoints = mean of the neighbouring corners and centres + wibble
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def _snow(x: np.ndarray, c: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, weight = c
    h, w = x.shape[:2]
    layer = rng.normal(size=(h, w), loc=loc, scale=scale)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = _motion_blur(np.clip(layer, 0, 1), radius=radius, sigma=sigma, angle=rng.uniform(-135, -45))
    layer = layer[..., None]
    gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]  # cv2.COLOR_RGB2GRAY
    x = weight * x + (1 - weight) * np.maximum(x, gray * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2)


def _frost_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Procedural stand-in for the frost photographs: hazy fractal base + bright needle-like crystals."""
    haze = _plasma_fractal(rng, _next_pow2(max(h, w)), wibbledecay=1.5)[:h, :w]
    # sparse seeds streaked in three random directions look like ice needles growing on glass
    seeds = np.where(rng.random((h, w)) < 0.08, rng.uniform(0.5, 1.0, (h, w)), 0.0)
    needles = np.zeros((h, w))
    for angle in rng.uniform(0, 360, size=3):
        needles = np.maximum(needles, _motion_blur(seeds, radius=3, sigma=2.0, angle=angle))
    needles /= needles.max() + 1e-8
    tex = np.clip(0.55 * haze**1.5 + 0.75 * needles, 0, 1)
    return tex[..., None] * np.array([0.82, 0.9, 1.0])  # icy blue-white tint, like the photos


def _frost(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    return c[0] * x + c[1] * _frost_texture(rng, *x.shape[:2])


def _fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    max_val = x.max()
    x = x + c[0] * _plasma_fractal(rng, _next_pow2(max(h, w)), wibbledecay=c[1])[:h, :w, None]
    return x * max_val / (max_val + c[0])

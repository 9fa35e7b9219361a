"""Noise corruptions: gaussian, shot (Poisson) and impulse (salt & pepper) noise.

Each is f(x HxWx3 float64 in [0,1], parameter, rng) -> HxWx3, clipped by the caller.
"""

from __future__ import annotations

import numpy as np


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # skimage random_noise(mode='s&p'): each value (per channel) flipped with prob c, half to 1, half to 0
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out

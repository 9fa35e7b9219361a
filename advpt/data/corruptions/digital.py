"""Digital corruptions: brightness, contrast, elastic transform, pixelate and JPEG compression.

Each is f(x HxWx3 float64 in [0,1], parameters, rng) -> HxWx3, clipped by the caller.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # HSV round trip with V += c: hue/saturation fixed, so RGB scales by V'/V (black -> grey of value c)
    v = x.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * v_new / np.maximum(v, 1e-12), v_new)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)  # per channel, as in the original
    return (x - means) * c + means


def _elastic_transform(x: np.ndarray, c: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    alpha, sigma, jitter = c
    h, w = x.shape[:2]
    # random affine from jittering three points (cv2.getAffineTransform + warpAffine, BORDER_REFLECT_101)
    center = np.array([w // 2, h // 2], dtype=np.float64)  # (x, y)
    size = min(h, w) // 3
    pts1 = np.array([center + size, [center[0] + size, center[1] - size], center - size])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape)
    forward = np.eye(3)
    forward[:2] = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # maps source (x, y) -> destination
    inverse = np.linalg.inv(forward)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
    src_y = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
    x = np.stack(
        [ndimage.map_coordinates(x[..., d], (src_y, src_x), order=1, mode="mirror") for d in range(3)], -1
    )
    # smooth random displacement field
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    coords = (yy + dy, xx + dx)
    return np.stack(
        [ndimage.map_coordinates(x[..., d], coords, order=1, mode="reflect") for d in range(3)], -1
    )


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    img = Image.fromarray(_to_uint8(x))
    img = img.resize((max(int(w * c), 1), max(int(h * c), 1)), Image.Resampling.BOX)
    img = img.resize((w, h), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64) / 255.0


def _jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=c)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255.0

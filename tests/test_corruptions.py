"""Tests for the CIFAR-10-C style common corruptions (advpt.data.corruptions)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

from advpt.data.corruptions import (
    CORRUPTIONS,
    PARAMS,
    CorruptedDataset,
    _clipped_zoom,
    _local_shuffle,
    _motion_blur,
    corrupt,
)

SIZE = 32


def textured(seed: int, size: int = SIZE) -> torch.Tensor:
    """Multi-scale random texture in [0,1]: detail at every scale, like a natural image."""
    g = torch.Generator().manual_seed(seed)
    octaves = [
        F.interpolate(torch.rand(1, 3, o, o, generator=g), size=size, mode="bilinear", align_corners=False)[0]
        for o in (4, 8, 16, 32)
    ]
    x = sum(octaves) / len(octaves)
    return ((x - x.mean()) * 2.0 + 0.5).clamp(0, 1)


def run(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    return corrupt(x, name, severity, torch.Generator().manual_seed(seed))


IMAGES = [textured(i) for i in range(6)]


def mean_mse(name: str, severity: int) -> float:
    # same seed per image across severities (common random numbers) so only the severity changes
    return float(
        np.mean([((run(x, name, severity, seed=k) - x) ** 2).mean().item() for k, x in enumerate(IMAGES)])
    )


class ListDataset(Dataset):
    def __init__(self, images: list[torch.Tensor], labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


# ------------------------------------------------------------------------------------------- API basics


def test_names_and_tables() -> None:
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert set(PARAMS) == set(CORRUPTIONS)
    assert all(len(PARAMS[n]) == 5 for n in CORRUPTIONS)
    # spot checks against make_cifar_c.py
    assert PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert PARAMS["glass_blur"][3] == (0.25, 1, 2)
    assert [len(z) for z in PARAMS["zoom_blur"]] == [7, 12, 16, 21, 26]  # np.arange(1, 1.06, .01) etc.


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_changes_image(name: str) -> None:
    x = IMAGES[0]
    for severity in range(1, 6):
        y = run(x, name, severity)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert (y - x).abs().max() > 1e-2, f"{name} s{severity} left the image unchanged"


def test_batch_non_square_and_dtypes() -> None:
    batch = torch.stack([textured(0), textured(1)])
    out = corrupt(batch, "gaussian_noise", 3, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    assert not torch.equal(out[0] - batch[0], out[1] - batch[1])  # each image draws its own noise
    rect = textured(2, size=48)[:, :, :40]
    for name in CORRUPTIONS:
        assert run(rect, name, 5).shape == (3, 48, 40)
    assert run(IMAGES[0].double(), "fog", 2).dtype == torch.float64


@pytest.mark.parametrize("bad", ["gaussian", "Gaussian_Noise", "speckle_noise", ""])
def test_unknown_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="gaussian_noise") as err:
        corrupt(IMAGES[0], bad, 1)
    assert "\n" not in str(err.value) and "jpeg_compression" in str(err.value)
    with pytest.raises(ValueError):
        CorruptedDataset(ListDataset(IMAGES, [0] * 6), bad, 1)


@pytest.mark.parametrize("bad", [0, 6, -1, 2.5, "3", True, None])
def test_bad_severity_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="1..5"):
        corrupt(IMAGES[0], "contrast", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1..5"):
        CorruptedDataset(ListDataset(IMAGES, [0] * 6), "contrast", bad)  # type: ignore[arg-type]


def test_bad_image_raises() -> None:
    with pytest.raises(ValueError):
        corrupt(torch.rand(1, 32, 32), "contrast", 1)
    with pytest.raises(ValueError):
        corrupt((torch.rand(3, 32, 32) * 255).to(torch.uint8), "contrast", 1)


# ------------------------------------------------------------------------------- severity behaviour

# MSE to the clean image grows with severity for these under the CIFAR tables; the others do not
# (see test_not_mse_monotone_cases_follow_their_tables): glass blur, frost and elastic_transform.
MSE_MONOTONE = [n for n in CORRUPTIONS if n not in ("glass_blur", "frost", "elastic_transform")]


@pytest.mark.parametrize("name", MSE_MONOTONE)
def test_severity_increases_mse(name: str) -> None:
    mse = [mean_mse(name, s) for s in range(1, 6)]
    for s in range(4):
        if name == "motion_blur" and s == 2:
            # table rows (6, 2) and (8, 2): same sigma, the wider kernel only adds ~1e-8 weights
            assert mse[3] == pytest.approx(mse[2], rel=1e-3)
        else:
            assert mse[s + 1] > mse[s], f"{name}: {mse}"


def test_not_mse_monotone_cases_follow_their_tables() -> None:
    # glass blur: a second shuffle pass at the same sigma distorts more (s4 vs s2, s5 vs s3)
    glass = [mean_mse("glass_blur", s) for s in range(1, 6)]
    assert glass[3] > glass[1] and glass[4] > glass[2]
    # frost: the image weight falls (1, 1, .9, .85, .75) while frost's share grows, so correlation drops
    corr = []
    for s in range(1, 6):
        ys = [run(x, "frost", s, seed=k) for k, x in enumerate(IMAGES)]
        corr.append(
            np.mean([np.corrcoef(y.flatten(), x.flatten())[0, 1] for x, y in zip(IMAGES, ys, strict=True)])
        )
    assert all(a > b for a, b in zip(corr, corr[1:], strict=False)), corr
    # elastic: severity 1 is a pure random affine warp (alpha 0), later ones add local displacement
    elastic = [mean_mse("elastic_transform", s) for s in range(1, 6)]
    assert all(m > 1e-3 for m in elastic)


def test_noise_strength_matches_table() -> None:
    grey = torch.full((3, 64, 64), 0.5)
    for s, std in enumerate(PARAMS["gaussian_noise"], start=1):
        assert (run(grey, "gaussian_noise", s) - grey).std().item() == pytest.approx(std, rel=0.08)
    for s, photons in enumerate(PARAMS["shot_noise"], start=1):
        var = (run(grey, "shot_noise", s) - grey).var().item()
        assert var == pytest.approx(0.5 / photons, rel=0.1)  # Poisson: var(k/c) = x/c
    for s, amount in enumerate(PARAMS["impulse_noise"], start=1):
        y = run(grey, "impulse_noise", s)
        assert ((y == 0) | (y == 1)).float().mean().item() == pytest.approx(amount, rel=0.15)


def test_brightness_raises_mean_and_matches_hsv() -> None:
    means = [x.mean().item() for x in IMAGES]
    prev = means
    for s in range(1, 6):
        cur = [run(x, "brightness", s).mean().item() for x in IMAGES]
        assert all(c > p for c, p in zip(cur, prev, strict=True))
        prev = cur
    # reference: HSV round trip with V += c (what skimage rgb2hsv/hsv2rgb does in the original)
    x = IMAGES[1]
    y = run(x, "brightness", 3)
    c = PARAMS["brightness"][2]
    for i, j in [(0, 0), (5, 17), (31, 31), (12, 3)]:
        h, sat, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
        ref = colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0))
        assert y[:, i, j].tolist() == pytest.approx(list(ref), abs=1e-5)
    assert run(torch.zeros(3, 8, 8), "brightness", 5).sub(0.3).abs().max() < 1e-6  # black -> grey V = c


def test_contrast_lowers_std_by_table_factor() -> None:
    # distinct channel means (to catch a global mean) and small amplitude (so nothing clips)
    x = torch.tensor([0.3, 0.5, 0.7])[:, None, None] + 0.2 * (
        IMAGES[2] - IMAGES[2].mean(dim=(1, 2), keepdim=True)
    )
    prev = x.std(dim=(1, 2))
    for s, factor in enumerate(PARAMS["contrast"], start=1):
        y = run(x, "contrast", s)
        std = y.std(dim=(1, 2))
        assert torch.allclose(std, factor * x.std(dim=(1, 2)), rtol=1e-4)
        assert (std < prev).all()
        assert torch.allclose(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=1e-5)  # per-channel means kept
        prev = std


# ------------------------------------------------------------------------------ helper faithfulness


def test_clipped_zoom_matches_scipy_zoom() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3))
    for z in (1.0, 1.06, 1.13, 1.25, 1.75, 2.25):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
        trim = (ref.shape[0] - 32) // 2
        np.testing.assert_allclose(_clipped_zoom(img, z), ref[trim : trim + 32, trim : trim + 32], atol=1e-12)


def test_local_shuffle_equals_original_loop() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    offsets = rng.integers(-1, 1, size=(2, 30, 30))
    ref = x.copy()
    for a, h in enumerate(range(31, 1, -1)):
        for b, w in enumerate(range(31, 1, -1)):
            dx, dy = offsets[:, a, b]
            # the original's "swap", numpy row views and all
            ref[h, w], ref[h + dy, w + dx] = ref[h + dy, w + dx], ref[h, w]
    np.testing.assert_array_equal(_local_shuffle(x, offsets, 1), ref)


def test_motion_blur_follows_angle() -> None:
    rows_vary = np.repeat(np.linspace(0, 1, 16)[:, None], 16, axis=1)
    np.testing.assert_allclose(_motion_blur(rows_vary, 6, 2, angle=0.0), rows_vary, atol=1e-12)
    assert np.abs(_motion_blur(rows_vary, 6, 2, angle=90.0) - rows_vary).max() > 0.05
    np.testing.assert_allclose(_motion_blur(rows_vary.T, 6, 2, angle=90.0), rows_vary.T, atol=1e-12)


# ---------------------------------------------------------------------------- determinism & dataset


def test_generator_determinism() -> None:
    x = IMAGES[3]
    for name in CORRUPTIONS:
        assert torch.equal(run(x, name, 4, seed=7), run(x, name, 4, seed=7)), name
    for name in ("gaussian_noise", "glass_blur", "snow", "frost", "fog", "elastic_transform"):
        assert not torch.equal(run(x, name, 4, seed=7), run(x, name, 4, seed=8)), name
    torch.manual_seed(3)
    a = corrupt(x, "shot_noise", 2)
    torch.manual_seed(3)
    assert torch.equal(a, corrupt(x, "shot_noise", 2))  # generator=None follows torch's global seed


def test_corrupted_dataset_labels_and_determinism() -> None:
    same = textured(9)
    base = ListDataset([same, same, IMAGES[0], IMAGES[1]], [3, 1, 4, 1])
    ds = CorruptedDataset(base, "gaussian_noise", 3, seed=5)
    assert len(ds) == 4
    for i in range(4):
        y, label = ds[i]
        assert label == base.labels[i] and y.shape == (3, SIZE, SIZE)
        assert torch.equal(y, CorruptedDataset(base, "gaussian_noise", 3, seed=5)[i][0])  # re-run identical
    assert not torch.equal(ds[0][0], ds[1][0])  # same clean image, different index -> different noise
    assert torch.equal(ds[-1][0], ds[3][0])
    assert not torch.equal(ds[0][0], CorruptedDataset(base, "gaussian_noise", 3, seed=6)[0][0])
    # seed + index: item i of seed s uses generator seed s + i
    expected = corrupt(same, "gaussian_noise", 3, torch.Generator().manual_seed(5 + 1))
    assert torch.equal(ds[1][0], expected)

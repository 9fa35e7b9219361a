"""Tests for the filter visualisation (App. D / Fig. 4): state-dict lookup, PCA, plotting."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from advpt.filters import (
    filter_components,
    patch_embedding_weight,
    plot_filters,
    principal_components,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hadamard(n: int) -> Tensor:
    """Sylvester Hadamard matrix (n a power of two): orthogonal rows with +-1 entries."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _planted_weight(stds: tuple[float, ...], d: int = 64, c: int = 3, p: int = 16, noise: float = 1e-3):
    """Filters = random combinations of known orthonormal directions with the given stds, then each feature
    given an arbitrary scale and offset.

    The directions have entries of equal magnitude (+-1/sqrt(F)), so every feature has the same variance
    and standardising maps the weight back to the planted low-rank matrix: the directions are the true
    principal components in standardised space. The wild per-feature scales (1e-2..1e2) mean a PCA
    without standardisation would not recover them.
    """
    g = torch.Generator().manual_seed(0)
    f = c * p * p
    # ones(c) (x) hadamard rows stay orthogonal and +-1 valued for F = c * p * p with p*p a power of two
    dirs = torch.kron(torch.ones(1, c, dtype=torch.float64), _hadamard(p * p)[1 : len(stds) + 1]) / f**0.5
    # exactly centred, orthonormal coefficient columns: sample variances are exactly stds**2
    a = torch.randn(d, len(stds), generator=g, dtype=torch.float64)
    a = torch.linalg.qr(a - a.mean(0))[0] * d**0.5
    z = a @ torch.diag(torch.tensor(stds, dtype=torch.float64)) @ dirs
    z = z + noise * torch.randn(d, f, generator=g, dtype=torch.float64)
    scale = 10 ** (4 * torch.rand(f, generator=g, dtype=torch.float64) - 2)
    offset = torch.randn(f, generator=g, dtype=torch.float64)
    return (z * scale + offset).reshape(d, c, p, p).float(), dirs


def _vit_b_weight(d: int = 768, seed: int = 0) -> Tensor:
    return torch.randn(d, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- PCA ----------------------------------------------------------------------------------------------


def test_recovers_planted_directions_in_order():
    weight, dirs = _planted_weight((10.0, 5.0, 1.0))
    comps = principal_components(weight, k=3)
    assert comps.shape == (3, 3, 16, 16)
    flat = comps.flatten(1).double()
    assert torch.allclose(flat.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-5)
    cos = (flat @ dirs.T).abs()
    # component i matches planted direction i, and only it
    assert (cos.diagonal() > 0.99).all(), cos
    assert (cos - torch.diag(cos.diagonal()) < 0.05).all(), cos


def test_pca_needs_standardisation():
    # guard for the test above: the per-feature scales really would hide the directions from plain PCA
    weight, dirs = _planted_weight((10.0, 5.0, 1.0))
    x = weight.double().flatten(1)
    vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:3]
    assert (vh @ dirs.T).abs().diagonal().max() < 0.9


def test_scaling_one_feature_changes_nothing():
    weight = _vit_b_weight(d=128)
    scaled = weight.clone()
    scaled[:, 1, 5, 7] *= 1000.0
    scaled[:, 0, 0, 0] += 50.0  # and a shift: standardisation removes both
    torch.testing.assert_close(filter_components(scaled), filter_components(weight), atol=1e-4, rtol=0)
    torch.testing.assert_close(principal_components(scaled), principal_components(weight), atol=1e-4, rtol=0)


def test_constant_feature_is_harmless():
    weight = _vit_b_weight(d=128)
    weight[:, 2, 3, 4] = 0.7  # zero variance: must not divide by zero or inject noise
    weight[:, 0, 1, 1] = 0.0
    comps = principal_components(weight, k=5)
    assert torch.isfinite(comps).all()
    assert comps[:, 2, 3, 4].abs().max() < 1e-6
    assert comps[:, 0, 1, 1].abs().max() < 1e-6


def test_shape_and_range_vit_b():
    comps = filter_components(_vit_b_weight())
    assert comps.shape == (28, 3, 16, 16)
    assert comps.dtype == torch.float32
    flat = comps.flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(28))
    torch.testing.assert_close(flat.amax(1), torch.ones(28))


@pytest.mark.parametrize(
    ("d", "c", "p", "expected"), [(10, 3, 16, 9), (2, 3, 16, 1), (64, 1, 2, 4), (64, 3, 4, 28)]
)
def test_fewer_components_when_not_enough(d, c, p, expected):
    # D filters span only D - 1 directions once centred; C*p*p features bound the count too
    weight = torch.randn(d, c, p, p, generator=torch.Generator().manual_seed(1))
    comps = filter_components(weight, k=28)
    assert comps.shape == (expected, c, p, p)
    assert comps.min() >= 0 and comps.max() <= 1


def test_sign_is_deterministic_and_order_invariant():
    weight = _vit_b_weight(d=256)
    first = principal_components(weight)
    torch.testing.assert_close(principal_components(weight), first, atol=0, rtol=0)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    permuted = principal_components(weight[perm])
    torch.testing.assert_close(permuted, first, atol=1e-4, rtol=0)
    torch.testing.assert_close(filter_components(weight[perm]), filter_components(weight), atol=1e-4, rtol=0)
    # the documented rule: each component's largest-magnitude entry is positive
    flat = first.flatten(1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()


def test_negated_weight_gives_same_components():
    # negating every filter flips all SVD signs; the sign rule must undo that
    weight = _vit_b_weight(d=128)
    torch.testing.assert_close(principal_components(-weight), principal_components(weight), atol=1e-4, rtol=0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="conv weight"):
        principal_components(torch.randn(8, 48))
    with pytest.raises(ValueError, match="k must"):
        principal_components(torch.randn(8, 3, 4, 4), k=0)
    with pytest.raises(ValueError, match="at least 2 filters"):
        principal_components(torch.randn(1, 3, 4, 4))


# --- state-dict lookup --------------------------------------------------------------------------------


def test_patch_embedding_weight_plain_and_prefixed():
    w = torch.randn(8, 3, 4, 4)
    other = {"blocks.0.attn.qkv.weight": torch.randn(24, 8), "patch_embed.proj.bias": torch.randn(8)}
    assert patch_embedding_weight({**other, "patch_embed.proj.weight": w}) is w
    for key in (
        "backbone.vit.patch_embed.proj.weight",
        "model.vit.patch_embed.proj.weight",
        "encoder.patch_embed.proj.weight",
    ):
        assert patch_embedding_weight({**other, key: w}) is w
    # a whole Lightning checkpoint is unwrapped
    assert patch_embedding_weight({"epoch": 3, "state_dict": {"backbone.patch_embed.proj.weight": w}}) is w


def test_patch_embedding_weight_errors():
    w = torch.randn(8, 3, 4, 4)
    with pytest.raises(ValueError, match="no key"):
        patch_embedding_weight({"blocks.0.norm1.weight": torch.randn(8)})
    with pytest.raises(ValueError, match="no key"):
        patch_embedding_weight({"decoder.xpatch_embed.proj.weight": w})  # suffix match is on whole names
    two = {"online.vit.patch_embed.proj.weight": w, "target.vit.patch_embed.proj.weight": w.clone()}
    with pytest.raises(ValueError, match="ambiguous"):
        patch_embedding_weight(two)
    # prefix= resolves the ambiguity (e.g. BYOL online vs target encoder)
    assert patch_embedding_weight(two, prefix="online.") is w
    with pytest.raises(ValueError, match="4-d"):
        patch_embedding_weight({"patch_embed.proj.weight": torch.randn(8, 48)})


# --- plotting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_panels", [1, 3])
def test_plot_filters_writes_png(tmp_path, n_panels):
    panels = [(f"ckpt {i}", filter_components(_vit_b_weight(d=96, seed=i))) for i in range(n_panels)]
    out = plot_filters(panels, tmp_path / "sub" / "filters.png")
    assert out == tmp_path / "sub" / "filters.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # 28 noisy RGB tiles per panel, not an empty canvas
    assert [f.name for f in out.parent.iterdir()] == ["filters.png"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary file mode, not a temp file's 0600


def test_plot_filters_image_content(tmp_path):
    import matplotlib.image as mpimg

    one = plot_filters([("a", filter_components(_vit_b_weight(d=96)))], tmp_path / "one.png")
    three = plot_filters(
        [(str(i), filter_components(_vit_b_weight(d=96, seed=i))) for i in range(3)], tmp_path / "three.png"
    )
    img1, img3 = mpimg.imread(one), mpimg.imread(three)
    # panels sit side by side: same height, roughly three times as wide
    assert img1.shape[0] == img3.shape[0]
    assert 2.5 < img3.shape[1] / img1.shape[1] < 3.5
    assert img1[..., :3].std() > 0.1  # actual coloured tiles were drawn


def test_plot_filters_mixed_sizes_and_grayscale(tmp_path):
    panels = [("k=5", filter_components(_vit_b_weight(d=5))), ("gray", torch.rand(28, 1, 8, 8))]
    out = plot_filters(panels, tmp_path / "mixed.png", ncols=4)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_filters_overwrites_and_rejects_bad_panels(tmp_path):
    target = tmp_path / "f.png"
    target.write_bytes(b"stale")
    plot_filters([("a", torch.rand(4, 3, 16, 16))], target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plot_filters([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="1- or 3-channel"):
        plot_filters([("a", torch.rand(4, 2, 16, 16))], tmp_path / "bad.png")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["f.png"]

"""MAE: its loss on the masked patches, its target and loss against MAE's own formulation, the attack on
the visible patches only, and the reconstruction figure."""

from __future__ import annotations

import pytest
import torch
from helpers import L2, batch_for, mae_2d_sincos, make_method

import advpt.methods.mae as mae_module
from advpt.methods.mae import mae_loss, per_patch_normalized
from advpt.methods.mae_parts import patch_mask_to_pixels, patchify, random_visible
from advpt.models import IMAGENET_MEAN, IMAGENET_STD


def test_mae_loss_counts_masked_patches_only() -> None:
    target = per_patch_normalized(torch.rand(2, 16, 48))
    _, visible = random_visible(2, 16, 0.75)
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = mae_loss(pred, target, visible)
    loss.sum().backward()
    assert (pred.grad[visible] == 0).all()
    assert (pred.grad[~visible].abs().sum(-1) > 0).all()
    # A perfect prediction on masked patches gives zero loss, whatever is predicted on visible ones.
    garbage_on_visible = torch.where(visible.unsqueeze(-1), torch.randn_like(target) * 100, target)
    torch.testing.assert_close(
        mae_loss(garbage_on_visible, target, visible), torch.zeros(2), atol=1e-5, rtol=0
    )


def mae_reference_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's ``patchify`` (models_mae.py)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def mae_reference_target(images: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's target with ``norm_pix_loss``: the image normalised with the dataset mean/std (as
    MAE's data pipeline does before the model), patchified, each patch to zero mean, unit variance."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    target = mae_reference_patchify((images - mean) / std, p)
    mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mu) / (var + 1.0e-6) ** 0.5


def test_mae_target_is_built_from_the_normalised_clean_image(monkeypatch) -> None:
    # A decoder that outputs MAE's target exactly scores zero: the target comes from the
    # mean/std-normalised image, not from [0,1] pixels.
    module = make_method("mae")
    (images,), labels = batch_for("mae")
    perfect = mae_reference_target(images, module.encoder.patch_size)
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: perfect)
    assert module.training_step(([images], labels), 0).item() == pytest.approx(0.0, abs=1e-6)


def test_mae_reconstructions_undo_the_target_normalisation(monkeypatch) -> None:
    # With a perfect decoder the reconstruction panel is the original image in [0, 1].
    module = make_method("mae")
    images = torch.rand(3, 3, 16, 16)
    perfect = mae_reference_target(images, module.encoder.patch_size)
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: perfect)
    _, pasted, _ = module.reconstructions(images).split(16, dim=-1)
    torch.testing.assert_close(pasted, images, atol=1e-5, rtol=0)


def test_nominal_mae_loss_equals_maes_formulation(monkeypatch) -> None:
    """MAE's forward_encoder / forward_decoder / forward_loss (models_mae.py), written out here on the
    module's weights and the same random mask, give the loss the training step optimises."""
    module = make_method("mae")
    module.train()
    (images,), labels = batch_for("mae")
    drawn = []
    real = mae_module.random_visible
    monkeypatch.setattr(
        mae_module, "random_visible", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1]
    )
    torch.manual_seed(7)
    loss = module.training_step(([images], labels), 0)

    vit, dec, p, mask_ratio = module.encoder.vit, module.decoder, module.encoder.patch_size, 0.75
    imgs = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    grid = imgs.shape[-1] // p
    torch.manual_seed(7)  # MAE's random_masking, from the same noise
    x = vit.patch_embed(imgs)
    n, length, dim = x.shape
    noise = torch.rand(n, length)
    x = x + mae_2d_sincos(dim, grid)[:, 1:]
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    assert torch.equal(ids_keep.sort(1).values, drawn[0][0].sort(1).values), "not the same mask"
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls_token = vit.cls_token + mae_2d_sincos(dim, grid)[:, :1]
    x = torch.cat([cls_token.expand(n, -1, -1), x], dim=1)
    for blk in vit.blocks:
        x = blk(x)
    x = vit.fc_norm(x)  # MAE's final encoder norm (timm calls it fc_norm when pooling by the mean)
    x = dec.embed(x)
    mask_tokens = dec.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + mae_2d_sincos(x.shape[-1], grid)
    for blk in dec.blocks:
        x = blk(x)
    pred = dec.pred(dec.norm(x))[:, 1:]
    target = mae_reference_target(images, p)
    reference = (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)


def test_patch_mask_to_pixels_matches_patchify_order() -> None:
    _, visible = random_visible(3, 16, 0.75)
    pixels = patch_mask_to_pixels(visible, (4, 4), 4).expand(-1, 3, -1, -1)
    as_patches = patchify(pixels, 4)
    assert torch.equal(as_patches.amax(-1).bool(), visible) and torch.equal(
        as_patches.amin(-1).bool(), visible
    )


def test_adversarial_mae_perturbs_visible_patches_with_one_shared_mask(record_pgd, monkeypatch) -> None:
    module = make_method("mae", attack=L2)
    seen = []
    real = module.reconstruct
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: seen.append(ids) or real(x, ids))
    module.training_step(batch_for("mae"), 0)
    (call,) = record_pgd
    # Every reconstruction in the step (attack iterations and the update) used the same mask.
    assert len(seen) == L2["steps"] + 1 and all(torch.equal(s, seen[0]) for s in seen)
    ids_keep = seen[0]
    visible = torch.zeros(8, 16, dtype=torch.bool).scatter_(1, ids_keep, True)
    delta_patches = patchify(call["delta"], module.encoder.patch_size).abs().amax(-1)
    assert (delta_patches[~visible] == 0).all(), "masked patches must stay clean"
    assert (delta_patches[visible] > 0).float().mean() > 0.9


def test_mae_reconstruction_figure_keeps_visible_patches() -> None:
    module = make_method("mae")
    module.eval()
    images = torch.rand(3, 3, 16, 16)
    figure = module.reconstructions(images)
    assert figure.shape == (3, 3, 16, 48)
    masked, pasted, original = figure.split(16, dim=-1)
    assert torch.equal(original, images)
    shown = patchify(masked, 4).abs().amax(-1) > 0  # the patches the masked panel shows are the visible ones
    assert shown.float().mean(1).allclose(torch.full((3,), 0.25))
    # Visible patches of the reconstruction panel are the original pixels, masked ones are predicted.
    same = (patchify(pasted, 4) == patchify(images, 4)).all(-1)
    assert torch.equal(same, shown)

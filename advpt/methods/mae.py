"""Masked autoencoding, nominal and adversarial (paper eqs. 3-4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from advpt.attacks import frozen
from advpt.methods.base import PretrainMethod
from advpt.models import MAEDecoder, patch_mask_to_pixels, patchify, random_visible, unpatchify


def mae_loss(pred: Tensor, target_patches: Tensor, visible: Tensor, norm_pix: bool = True) -> Tensor:
    """Per-example MSE over the masked patches only, against per-patch-normalised targets."""
    if norm_pix:
        mean = target_patches.mean(dim=-1, keepdim=True)
        var = target_patches.var(dim=-1, keepdim=True)
        target_patches = (target_patches - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target_patches.float()).pow(2).mean(dim=-1)
    masked = (~visible).float()
    return (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1.0)


class MAE(PretrainMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dec = self.hparams.model["mae_decoder"]
        self.decoder = MAEDecoder(
            self.encoder.dim,
            self.encoder.grid_size,
            self.encoder.patch_size,
            dim=dec["dim"],
            depth=dec["depth"],
            heads=dec["heads"],
            mlp_dim=dec["mlp_dim"],
        )
        self.mask_ratio = float(self.method_cfg["mask_ratio"])

    def reconstruct(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        tokens = self.encoder.visible_tokens(images, ids_keep)
        return self.decoder(tokens, ids_keep, self.encoder.grid_size[0] * self.encoder.grid_size[1])

    @torch.no_grad()
    def reconstructions(self, images: Tensor) -> Tensor:
        """[N, 3, H, 3W] in [0, 1]: masked input | reconstruction with the visible patches pasted back | original."""
        grid, p = self.encoder.grid_size, self.encoder.patch_size
        ids_keep, visible = random_visible(images.shape[0], grid[0] * grid[1], self.mask_ratio, images.device)
        target = patchify(images, p)
        pred = self.reconstruct(images, ids_keep).float()
        if self.method_cfg.get("norm_pix_loss", True):  # predictions are per-patch normalised pixels
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        keep = visible.unsqueeze(-1)
        masked = unpatchify(target * keep, p)
        pasted = unpatchify(torch.where(keep, target, pred), p)
        return torch.cat([masked, pasted, images], dim=-1).clamp(0, 1)

    def example_images(self) -> dict[str, Tensor]:
        figures = super().example_images()
        if getattr(self, "_last_images", None) is not None:
            with frozen(self):
                figures["mae_reconstructions"] = self.reconstructions(self._last_images)
        return figures

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (images,), _ = batch
        self._last_images = images[:8].detach()
        num_patches = self.encoder.grid_size[0] * self.encoder.grid_size[1]
        # One mask per step, shared by the attack and the update (eq. 4).
        ids_keep, visible = random_visible(images.shape[0], num_patches, self.mask_ratio, images.device)
        target = patchify(images, self.encoder.patch_size)  # clean pixels: the target is never attacked
        norm_pix = bool(self.method_cfg.get("norm_pix_loss", True))

        def loss_fn(x: Tensor) -> Tensor:
            return mae_loss(self.reconstruct(x, ids_keep), target, visible, norm_pix)

        # Only visible patches are perturbed: masked ones are the target, never the input.
        support = patch_mask_to_pixels(visible, self.encoder.grid_size, self.encoder.patch_size)
        x = self.attacked(loss_fn, images, support=support)
        loss = self.reduce(loss_fn(x))
        self.log_loss(loss, images.shape[0])
        return loss

"""Masked autoencoding, nominal and adversarial (paper eqs. 3-4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from advpt.attacks import frozen
from advpt.methods.base import PretrainMethod
from advpt.methods.mae_parts import (
    MAEDecoder,
    check_decoder,
    mae_initialize,
    patch_mask_to_pixels,
    patchify,
    random_visible,
    unpatchify,
)
from advpt.methods.sizes import sized_for

if TYPE_CHECKING:
    from advpt.published import Weights


def per_patch_normalized(patches: Tensor) -> Tensor:
    """MAE's ``norm_pix_loss``: each patch [.., p*p*C] to zero mean and unit (unbiased) variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()


def mae_loss(pred: Tensor, target: Tensor, visible: Tensor) -> Tensor:
    """Per-example MSE over the masked patches only.

    Every example has the same number of masked patches, so the batch mean of this equals MAE's
    mean over all masked patches of the batch.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    masked = (~visible).float()
    return (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1.0)


class MAE(PretrainMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # MAE's init and fixed sin-cos positions are part of the MAE method; BYOL, RotNet and
        # supervised keep timm's ViT init and learned positions, as MAE's from-scratch baseline does.
        mae_initialize(self.encoder.vit)
        self.decoder = MAEDecoder.for_encoder(
            sized_for(self.method_cfg["decoder"], self.encoder.dim),
            self.encoder.dim,
            self.encoder.grid_size,
            self.encoder.patch_size,
        )
        self.mask_ratio = float(self.method_cfg["mask_ratio"])
        self.norm_pix = bool(self.method_cfg.get("norm_pix_loss", True))

    @classmethod
    def check_init_parts(
        cls, weights: Weights, vit: nn.Module, method: Mapping[str, Any], source: str
    ) -> None:
        """A source's decoder, where it has one, must fit ``method.decoder``'s at the encoder's width."""
        if weights.decoder:
            grid, patch = tuple(vit.patch_embed.grid_size), vit.patch_embed.patch_size[0]
            sizes = sized_for(method["decoder"], vit.embed_dim)
            with torch.device("meta"):
                decoder = MAEDecoder.for_encoder(sizes, vit.embed_dim, grid, patch)
            check_decoder(weights.decoder, decoder, sizes, vit.embed_dim, source)

    def load_init_parts(self, weights: Weights, source: str) -> str:
        """The source's decoder where it has one; else the decoder starts fresh."""
        from advpt.published import shown_source

        shown = shown_source(source)
        if not weights.decoder:
            return f"loaded the encoder of init={shown}; it has no MAE decoder: the decoder starts fresh"
        sizes = sized_for(self.method_cfg["decoder"], self.encoder.dim)
        check_decoder(weights.decoder, self.decoder, sizes, self.encoder.dim, source)
        self.decoder.load_state_dict(dict(weights.decoder))
        return f"loaded the encoder and the MAE decoder of init={shown}"

    def target_patches(self, images: Tensor) -> Tensor:
        """What the decoder predicts: patches of the mean/std-normalised image (MAE normalises the
        image before anything else), each normalised on its own when ``norm_pix_loss``."""
        patches = patchify(self.encoder.normalize(images.float()), self.encoder.patch_size)
        return per_patch_normalized(patches) if self.norm_pix else patches

    def reconstruct(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        tokens = self.encoder.visible_tokens(images, ids_keep)
        return self.decoder(tokens, ids_keep, self.encoder.grid_size[0] * self.encoder.grid_size[1])

    @torch.no_grad()
    def reconstructions(self, images: Tensor) -> Tensor:
        """[N, 3, H, 3W] in [0, 1]: masked input | reconstruction with the visible patches pasted back | original."""
        grid, p = self.encoder.grid_size, self.encoder.patch_size
        ids_keep, visible = random_visible(images.shape[0], grid[0] * grid[1], self.mask_ratio, images.device)
        pred = self.reconstruct(images, ids_keep).float()
        if self.norm_pix:  # undo the per-patch normalisation with the statistics of the true patch
            patches = patchify(self.encoder.normalize(images.float()), p)
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        predicted = self.encoder.denormalize(unpatchify(pred, p, images.shape[1]))
        keep = patch_mask_to_pixels(visible, grid, p).bool()
        masked = images.float() * keep
        pasted = torch.where(keep, images.float(), predicted)
        return torch.cat([masked, pasted, images.float()], dim=-1).clamp(0, 1)

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
        target = self.target_patches(images)  # clean image: the target is never attacked

        def loss_fn(x: Tensor) -> Tensor:
            return mae_loss(self.reconstruct(x, ids_keep), target, visible)

        # Only visible patches are perturbed: masked ones are the target, never the input.
        support = patch_mask_to_pixels(visible, self.encoder.grid_size, self.encoder.patch_size)
        x = self.attacked(loss_fn, images, support=support)
        loss = self.reduce(loss_fn(x))
        self.log_loss(loss, images.shape[0])
        return loss

"""The networks: a timm ViT reading [0,1] pixels, the MAE decoder and the BYOL MLP heads.

One architecture serves every method (paper App. C): a timm ``VisionTransformer`` with
``global_pool="avg"``, i.e. the classifier reads the mean of the final tokens excluding the class
token, followed by ``fc_norm`` (MAE's fine-tuning model). Its state dict is a plain timm state dict,
so encoder weights load into ``timm.create_model(name, **kwargs)`` by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_kwargs(model_cfg: Mapping[str, Any], num_classes: int = 0) -> dict[str, Any]:
    """Arguments for ``timm.create_model(model_cfg['name'], **kwargs)`` for our ViT variant."""
    return {
        "img_size": int(model_cfg["img_size"]),
        "patch_size": int(model_cfg["patch_size"]),
        "num_classes": num_classes,
        "global_pool": "avg",
        **dict(model_cfg.get("kwargs") or {}),
    }


class Encoder(nn.Module):
    """timm ViT that takes images in [0,1] and normalises them itself.

    Attacks perturb pixels, so normalisation must sit inside the differentiated function.
    """

    def __init__(self, name: str, kwargs: Mapping[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.name, self.kwargs = name, dict(kwargs)
        self.vit = timm.create_model(name, pretrained=False, **self.kwargs)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], num_classes: int = 0, **overrides: Any) -> Encoder:
        return cls(model_cfg["name"], {**timm_kwargs(model_cfg, num_classes), **overrides})

    @property
    def dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: Tensor) -> Tensor:
        """Pooled representation: mean of the final patch tokens, then ``fc_norm``."""
        return self.vit.forward_head(self.vit.forward_features(self.normalize(x)), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the timm head (identity when built with ``num_classes=0``)."""
        return self.vit(self.normalize(x))

    def visible_tokens(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the patches listed in ``ids_keep`` [B, n_keep] (MAE); returns [B, 1+n_keep, D].

        The class token is kept; each token is layer-normalised with ``fc_norm`` (the encoder's
        final norm in the mean-pooled timm ViT).
        """
        vit = self.vit
        tokens = vit.patch_embed(self.normalize(x))
        tokens = tokens + vit.pos_embed[:, vit.num_prefix_tokens :]
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = vit.norm_pre(torch.cat([cls, tokens], dim=1))
        tokens = vit.blocks(tokens)
        return vit.fc_norm(vit.norm(tokens))


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in row-major order (as timm's patch embedding)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for square grids."""
    b, n, _ = patches.shape
    p, g = patch_size, int(round(n**0.5))
    x = patches.reshape(b, g, g, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, g * p, g * p)


def random_visible(batch: int, num_patches: int, mask_ratio: float, device=None) -> tuple[Tensor, Tensor]:
    """Draw MAE's random mask: returns ``ids_keep`` [B, n_keep] and ``visible`` [B, N] (bool)."""
    n_keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    ids_keep = torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :n_keep]
    visible = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    visible.scatter_(1, ids_keep, True)
    return ids_keep, visible


def patch_mask_to_pixels(visible: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """[B, N] patch mask -> [B, 1, H, W] pixel mask (float), for restricting a perturbation."""
    m = visible.float().view(-1, 1, *grid)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: embed, fill masked positions with a mask token, transformer, predict pixels."""

    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, int],
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_dim: int = 2048,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed 2-D sin-cos positions as in MAE; class-token slot gets zeros.
        pos = build_sincos2d_pos_embed(list(grid), dim=dim)
        self.register_buffer(
            "pos_embed", torch.cat([torch.zeros(1, dim), pos], 0).unsqueeze(0), persistent=False
        )
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio=mlp_dim / dim, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, tokens: Tensor, ids_keep: Tensor, num_patches: int) -> Tensor:
        """tokens [B, 1+n_keep, D_enc] -> pixel predictions for every patch [B, N, p*p*C]."""
        x = self.embed(tokens)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, num_patches, d).clone()
        full.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL projector / predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )

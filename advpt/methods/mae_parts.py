"""MAE's own parts (``models_mae.py``): patches, the random mask, its initialisation of the encoder and
its decoder; and what it takes from ``init=`` beyond the encoder.

The encoder is the shared one (:class:`advpt.models.Encoder`); MAE pre-training re-initialises its ViT as
MAE does (:func:`mae_initialize`: fixed 2-D sin-cos positions, xavier-uniform linears), and the exported
weights still form a plain timm state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from advpt.errors import UserError
from advpt.published import first_difference, shown_source


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


def sincos_pos_embed(dim: int, grid: tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, [1, prefix_tokens + H*W, dim] (``get_2d_sincos_pos_embed``).

    Patches in row-major order; the first half of the channels encodes the column, the second half
    the row, each as [sin | cos] of position x 1/10000^(k/(dim/4)); class-token slots are zeros.
    (timm's ``build_sincos2d_pos_embed`` orders the channels differently, so it is not used.)
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(position: Tensor) -> Tensor:
        angle = position.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    patches = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), patches]).float().unsqueeze(0)


def _mae_init_layer(m: nn.Module) -> None:
    # MAE initialises every linear layer with xavier-uniform (after the JAX ViT) and resets LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def mae_initialize(vit: VisionTransformer) -> None:
    """Initialise a timm ViT in place as MAE's pre-training does (``models_mae.py``, ``initialize_weights``).

    The position embedding becomes the fixed sin-cos one and is not trained (``requires_grad`` off);
    it stays the ViT's ``pos_embed`` so an exported encoder starts fine-tuning from it. The patch
    projection is initialised as the linear layer it is, the class token from N(0, 0.02).
    """
    num_patches = vit.patch_embed.num_patches
    pos = sincos_pos_embed(
        vit.embed_dim, tuple(vit.patch_embed.grid_size), vit.pos_embed.shape[1] - num_patches
    )
    with torch.no_grad():
        vit.pos_embed.copy_(pos)
        weight = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    vit.pos_embed.requires_grad_(False)
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=0.02)
    vit.apply(_mae_init_layer)


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
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # MAE's decoder norms
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed 2-D sin-cos positions as in MAE; a buffer, so never trained.
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio=mlp_dim / dim, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_mae_init_layer)

    @classmethod
    def for_encoder(
        cls, sizes: Mapping[str, Any], encoder_dim: int, grid: tuple[int, int], patch_size: int
    ) -> MAEDecoder:
        """The decoder of ``sizes`` (dim, depth, heads, mlp_dim: ``method.decoder``'s) for an encoder."""
        return cls(
            encoder_dim,
            grid,
            patch_size,
            dim=sizes["dim"],
            depth=sizes["depth"],
            heads=sizes["heads"],
            mlp_dim=sizes["mlp_dim"],
        )

    def forward(self, tokens: Tensor, ids_keep: Tensor, num_patches: int) -> Tensor:
        """tokens [B, 1+n_keep, D_enc] -> pixel predictions for every patch [B, N, p*p*C]."""
        x = self.embed(tokens)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, num_patches, d).clone()
        full.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def check_decoder(
    weights: Mapping[str, Tensor], decoder: nn.Module, sizes: Mapping[str, Any], width: int, source: str
) -> None:
    """One line if ``init=``'s MAE decoder (advpt's names) does not fit ``decoder``: ``sizes``, what
    ``method.decoder`` gives an encoder ``width`` wide."""
    problem = first_difference(weights, decoder.state_dict())
    if problem:
        raise UserError(
            f"init={shown_source(source)} has an MAE decoder that does not fit method.decoder's at width "
            f"{width} ({dict(sizes)}): {problem}; set method.decoder.{width}.* to the one it was made with"
        )

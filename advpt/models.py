"""The networks: a timm ViT reading [0,1] pixels, the MAE decoder and the BYOL MLP heads.

One architecture serves every method (paper App. C): a timm ``VisionTransformer`` with
``global_pool="avg"``, i.e. the classifier reads the mean of the final tokens excluding the class
token, followed by ``fc_norm`` (MAE's fine-tuning model). Its state dict is a plain timm state dict,
so encoder weights load into ``timm.create_model(name, **kwargs)`` by name.

MAE pre-training re-initialises that ViT as MAE does (:func:`mae_initialize`: fixed 2-D sin-cos
positions, xavier-uniform linears); the exported weights still form a plain timm state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
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


# timm_kwargs() fills these from the model config; the rest of encoder.json's kwargs is model.kwargs.
_DERIVED_KWARGS = ("img_size", "patch_size", "num_classes", "global_pool")


def model_config(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model group (name, img_size, patch_size, kwargs) behind ``timm.create_model(name, **kwargs)``."""
    return {
        "name": name,
        "img_size": int(kwargs["img_size"]),
        "patch_size": int(kwargs["patch_size"]),
        "kwargs": {k: v for k, v in kwargs.items() if k not in _DERIVED_KWARGS},
    }


def architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    """What a given ``model=`` must share with an encoder: the timm name and its constructor kwargs."""
    return {"name": model["name"], **timm_kwargs(model)}


class PatchConv2d(nn.Conv2d):
    """A patch embedding (kernel = stride, no padding) computed as one matrix product of the flattened
    patches: the same weights, state-dict names and outputs as the ``nn.Conv2d`` it replaces, to float
    rounding.

    Written by hand because PGD differentiates every step with respect to the input, and on CPU the
    convolution's input gradient (oneDNN's strided backward-data) costs several times its forward,
    where a matrix product's costs what its forward does.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """``conv`` itself if it is not a patch embedding, else this class holding its parameters."""
        patchwise = (
            conv.stride == conv.kernel_size
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )
        if not patchwise:
            return conv
        fast = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None
        )
        fast.weight, fast.bias = conv.weight, conv.bias
        return fast

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p, q = self.kernel_size
        if h % p or w % q:  # a partial patch: the convolution drops it
            return super().forward(x)
        gh, gw = h // p, w // q
        patches = x.reshape(b, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * q)
        out = nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.transpose(1, 2).reshape(b, self.out_channels, gh, gw)  # [B, D, h, w], as the conv


class DropPathBuffer(nn.Module):
    """timm's ``DropPath`` (stochastic depth, scaled by the keep probability) with its rate held in a
    buffer rather than a Python float.

    ``torch.compile`` bakes a module's float attributes into the graph: timm's blocks, each with its own
    drop-path rate (and block 0, at rate 0, an ``nn.Identity``), would each compile a graph of their own,
    and past dynamo's recompile limit the remaining blocks would silently run eagerly. A buffer is a
    graph input, so one graph serves every block. It keeps and scales as timm's does, with the same
    probabilities (not the same random draws).
    """

    def __init__(self, rate: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("rate", torch.tensor(float(rate), device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.bernoulli(keep.to(x.dtype).expand((x.shape[0],) + (1,) * (x.ndim - 1)))
        return x * (mask / keep.to(x.dtype))


def buffered_drop_path(block: Block) -> None:
    """Give ``block`` (a timm ViT block) :class:`DropPathBuffer` in place of its ``DropPath`` or
    ``Identity`` (rate 0): what ``compile=true`` does before compiling it, so that blocks of different
    rates share one graph. Parameter names and the state dict are unchanged."""
    from timm.layers import DropPath

    device = next(block.parameters()).device
    for name in ("drop_path1", "drop_path2"):
        current = getattr(block, name, None)
        if isinstance(current, DropPath):
            setattr(block, name, DropPathBuffer(current.drop_prob, device))
        elif isinstance(current, nn.Identity):
            setattr(block, name, DropPathBuffer(0.0, device))


class Encoder(nn.Module):
    """timm ViT that takes images in [0,1] and normalises them itself.

    Attacks perturb pixels, so normalisation must sit inside the differentiated function.
    """

    def __init__(self, name: str, kwargs: Mapping[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.name, self.kwargs = name, dict(kwargs)
        self.vit = timm.create_model(name, pretrained=False, **self.kwargs)
        embed = self.vit.patch_embed
        embed.proj = PatchConv2d.replacing(embed.proj)
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

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: back to [0,1] pixels."""
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)

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

    def forward(self, tokens: Tensor, ids_keep: Tensor, num_patches: int) -> Tensor:
        """tokens [B, 1+n_keep, D_enc] -> pixel predictions for every patch [B, N, p*p*C]."""
        x = self.embed(tokens)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, num_patches, d).clone()
        full.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL projector / predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )

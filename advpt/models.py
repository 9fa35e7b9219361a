"""The encoder every method shares: a timm ViT reading [0,1] pixels.

One architecture serves every method (paper App. C): a timm ``VisionTransformer`` with
``global_pool="avg"``, i.e. the classifier reads the mean of the final tokens excluding the class
token, followed by ``fc_norm`` (MAE's fine-tuning model). Its state dict is a plain timm state dict,
so encoder weights load into ``timm.create_model(name, **kwargs)`` by name.

A method's own networks (a decoder, heads) live with the method, in ``advpt.methods``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
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
        """Pooled representation: mean of the final patch tokens, then ``fc_norm``.

        An input of another side than the model's (DINO's local crops) reads the position embedding
        resampled to its grid (:meth:`resized_tokens`); at the model's own side this is timm's forward.
        """
        if tuple(x.shape[-2:]) != tuple(self.vit.patch_embed.img_size):
            return self.vit.forward_head(self.resized_tokens(self.normalize(x)), pre_logits=True)
        return self.vit.forward_head(self.vit.forward_features(self.normalize(x)), pre_logits=True)

    def resized_tokens(self, x: Tensor) -> Tensor:
        """timm's ``forward_features`` for a normalised input of any side that is a multiple of the patch:
        the position embedding resampled (bicubic) to its grid, as timm's ``dynamic_img_size`` does and
        DINO's multi-crop needs (Caron et al. 2021, Sec. 4), without changing the model's own kwargs."""
        from timm.layers import resample_abs_pos_embed

        vit, embed = self.vit, self.vit.patch_embed
        grid = embed.proj(x)  # [B, D, h, w]
        tokens = embed.norm(grid.flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        pos = resample_abs_pos_embed(
            vit.pos_embed,
            new_size=list(grid.shape[-2:]),
            old_size=list(embed.grid_size),
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        )
        if vit.no_embed_class:
            tokens = torch.cat([*prefix, tokens + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        return vit.norm(vit.blocks(tokens))

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

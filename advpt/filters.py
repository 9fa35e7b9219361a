"""The filters of a patch embedding as images (paper App. D / Fig. 4): what `advpt visualize` draws.

Filters: "We extract the first principal components of the standardized embedding weights. Then we
reshape and rescale these principal components to 16x16x3 RGB images" (first 28 components).
``patch_embedding_weight`` finds the conv weight in a state dict, ``principal_components`` /
``filter_components`` compute the (rescaled) components, ``plot_filters`` draws checkpoints side by side.

Everything draws on explicit ``matplotlib.figure.Figure`` objects (no pyplot), so no display or global
backend state is needed and concurrent callers do not share figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from advpt.files import atomic_path

# ---------------------------------------------------------------------------------------------------------
# Patch-embedding filters (App. D / Fig. 4)
# ---------------------------------------------------------------------------------------------------------

PATCH_EMBED_KEY = "patch_embed.proj.weight"
# Features whose std across filters is below this fraction of their magnitude count as constant.
_ZERO_VAR_RTOL = 1e-10


def patch_embedding_weight(state_dict: Mapping[str, Tensor], prefix: str | None = None) -> Tensor:
    """Return the ViT patch-embedding conv weight ``[D, C, p, p]`` from a (possibly prefixed) state dict.

    Takes the unique key ending in ``patch_embed.proj.weight`` (timm naming, e.g. under ``backbone.vit.``).
    A full Lightning checkpoint (with a ``"state_dict"`` entry) is unwrapped. ``prefix`` restricts the
    search to keys starting with it, to pick one encoder when there are several (e.g. online/target).
    """
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    matches = [
        k
        for k in state_dict
        if isinstance(k, str)
        and k.endswith(PATCH_EMBED_KEY)
        and (prefix is None or k.startswith(prefix))
        and (k == PATCH_EMBED_KEY or k.endswith("." + PATCH_EMBED_KEY))
    ]
    where = "" if prefix is None else f" starting with {prefix!r}"
    if not matches:
        raise ValueError(
            f"no key ending in {PATCH_EMBED_KEY!r}{where} in state dict ({len(state_dict)} keys)"
        )
    if len(matches) > 1:
        raise ValueError(
            f"ambiguous patch embedding: {len(matches)} keys end in {PATCH_EMBED_KEY!r}{where}: "
            f"{sorted(matches)}; pass prefix= to choose one"
        )
    weight = state_dict[matches[0]]
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{matches[0]!r} is not a 4-d conv weight [D, C, p, p]: got {shape}")
    return weight


def principal_components(weight: Tensor, k: int = 28) -> Tensor:
    """First ``k`` unit-norm principal directions of the standardised filters, shaped ``[k, C, p, p]``.

    The ``D`` filters are ``D`` samples of dimension ``C*p*p``; each feature is standardised across them
    (constant features are zeroed), then an exact SVD gives the directions in decreasing-variance order.
    Signs are fixed so each component's largest-magnitude entry is positive. Returns
    ``min(k, D - 1, C*p*p)`` components (float32, CPU): centring leaves ``D`` filters only ``D - 1``
    directions with any variance, and a zero-variance direction would be an arbitrary SVD artefact.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight [D, C, p, p], got shape {tuple(weight.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d, c, ph, pw = weight.shape
    if d < 2:
        raise ValueError(f"need at least 2 filters for PCA, got D={d}")
    # float64 on CPU: exact, reproducible SVD whatever the checkpoint's dtype/device (bf16, CUDA...)
    x = weight.detach().to("cpu", torch.float64).reshape(d, c * ph * pw)
    centred = x - x.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0).sqrt()
    # relative test: centring a constant column can leave float dust that must not be blown up to unit variance
    constant = std <= _ZERO_VAR_RTOL * x.abs().amax(dim=0)
    z = torch.where(constant, torch.zeros_like(centred), centred / torch.where(constant, 1.0, std))
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    comps = vh[: min(k, d - 1, vh.shape[0])]
    # SVD signs are arbitrary: pin them so figures do not flip between runs or filter orderings
    peak = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
    comps = comps * torch.where(peak < 0, -1.0, 1.0)
    return comps.to(torch.float32).reshape(-1, c, ph, pw)


def filter_components(weight: Tensor, k: int = 28) -> Tensor:
    """``principal_components`` with each component min-max rescaled independently to ``[0, 1]``."""
    comps = principal_components(weight, k)
    flat = comps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    # a constant component (one feature, or filters differing only in brightness) has zero span: map it to 0
    flat = (flat - lo) / torch.where(span > 0, span, 1.0)
    return flat.reshape(comps.shape)


def _filter_mosaic(components: Tensor, ncols: int, scale: int, pad: int = 1) -> np.ndarray:
    """Tile ``[k, C, p, p]`` images (values in [0, 1]) into one ``H x W x 3`` array on a white background."""
    k, c, ph, pw = components.shape
    if c not in (1, 3):
        raise ValueError(f"can only draw 1- or 3-channel filters, got C={c}")
    imgs = components.detach().to("cpu", torch.float32).clamp(0, 1).expand(k, 3, ph, pw)
    # explicit integer nearest-neighbour upscaling: crisp pixels regardless of the renderer's resampling
    imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).permute(0, 2, 3, 1).numpy()
    th, tw = ph * scale, pw * scale
    ncols = min(ncols, k)
    nrows = -(-k // ncols)
    mosaic = np.ones((nrows * (th + pad) + pad, ncols * (tw + pad) + pad, 3), dtype=np.float32)
    for i, img in enumerate(imgs):
        r, col = divmod(i, ncols)
        y, x = pad + r * (th + pad), pad + col * (tw + pad)
        mosaic[y : y + th, x : x + tw] = img
    return mosaic


def _save_atomic(fig: Figure, path: Path, dpi: int) -> None:
    """Write ``fig`` as PNG via a temp file in the same directory + ``os.replace`` (readers never see half a file)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_filters(
    panels: Sequence[tuple[str, Tensor]],
    path: str | Path,
    ncols: int = 7,
    tile_px: int = 48,
    dpi: int = 100,
) -> Path:
    """Draw one panel per checkpoint, side by side, each a grid of its filter components; write a PNG.

    ``panels`` are ``(title, components [k, C, p, p])`` with values in [0, 1] (see ``filter_components``);
    ``ncols`` images per row (28 -> 4 x 7). Each ``p x p`` filter is upscaled by nearest neighbour to about
    ``tile_px`` pixels. The PNG is written atomically; returns its path.
    """
    if not panels:
        raise ValueError("plot_filters needs at least one panel")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    path = Path(path)
    mosaics = []
    for title, comps in panels:
        if comps.dim() != 4 or comps.shape[0] == 0:
            raise ValueError(
                f"panel {title!r}: expected components [k, C, p, p] with k >= 1, got {tuple(comps.shape)}"
            )
        scale = max(1, round(tile_px / max(comps.shape[-2:])))
        mosaics.append(_filter_mosaic(comps, ncols, scale))

    # place mosaics pixel-exactly with figimage: axes+imshow would resample them, and nearest-neighbour
    # resampling at a non-integer factor drops or doubles pixel columns (uneven stripes)
    gap, title_px, fontsize = 16, 30, 10
    # widen a slot for a long title (~0.6 em per character) so neighbouring titles do not overlap
    slots = [
        max(m.shape[1], int(0.6 * fontsize * dpi / 72 * len(t)) + 4)
        for (t, _), m in zip(panels, mosaics, strict=True)
    ]
    width = gap + sum(w + gap for w in slots)
    height = title_px + max(m.shape[0] for m in mosaics) + gap
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    x = gap
    for (title, _), mosaic, slot in zip(panels, mosaics, slots, strict=True):
        h, w = mosaic.shape[:2]
        xo = x + (slot - w) // 2
        # figimage offsets are from the bottom-left; top-align panels of different heights
        fig.figimage(mosaic, xo=xo, yo=height - title_px - h, origin="upper", resize=False)
        fig.text(
            (x + slot / 2) / width,
            1 - title_px / 2 / height,
            title,
            ha="center",
            va="center",
            fontsize=fontsize,
        )
        x += slot + gap
    _save_atomic(fig, path, dpi)
    return path

"""Weights made elsewhere as a starting point: the official MAE release (a ``.pth``) and timm's models
(``timm:NAME``), for ``advpt finetune pretrained=`` and ``advpt pretrain init=``.

The MAE release (facebookresearch/mae) is ``{'model': state_dict}``. Its encoder keys are timm's
``VisionTransformer`` names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``), as
are a timm model's. Their final norm, ``norm.*`` (``fc_norm.*`` in a fine-tuned release), is advpt's
``fc_norm``: advpt's ViT pools, then normalises, and its MAE reads every token through ``fc_norm``.
The decoder (``mask_token``, ``decoder_*``) maps onto MAE's own (``advpt.methods.mae_parts``), except
``decoder_pos_embed``: MAE's fixed sin-cos table, which that decoder computes for its own grid. Whether a
method takes a source's decoder is the method's to say (``PretrainMethod.check_init_parts``).

The architecture is ``model=``'s: every weight must be there with its shape (the classifier head
aside); a different image size only resamples the position embedding. Files are read as data
(:func:`advpt.trust.load_checkpoint`); timm reads its own downloads as safetensors or weights-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advpt.errors import UserError
from advpt.models import timm_kwargs
from advpt.trust import load_checkpoint

TIMM = "timm:"
RELEASE_SUFFIXES = (".pth", ".pt")
ADVPT_SUFFIXES = (".safetensors", ".ckpt")  # advpt's own encoder and checkpoint, for init=
ACCEPTED = "an MAE release .pth, timm:NAME, or an advpt encoder.safetensors, run directory or last.ckpt"
# The release's decoder names -> advpt's names for MAE's decoder (prefixes).
DECODER_NAMES = {
    "mask_token": "mask_token",
    "decoder_embed.": "embed.",
    "decoder_blocks.": "blocks.",
    "decoder_norm.": "norm.",
    "decoder_pred.": "pred.",
}
COMPUTED = ("decoder_pos_embed",)  # fixed sin-cos: advpt's decoder computes it


def is_published(value: Any) -> bool:
    """Whether a setting names weights made elsewhere: ``timm:NAME`` or a ``.pth`` / ``.pt`` file."""
    text = str(value)
    return text.startswith(TIMM) or Path(text).suffix.lower() in RELEASE_SUFFIXES


@dataclass(frozen=True)
class Weights:
    """A source's weights under advpt's names: the encoder (a timm ViT) and MAE's decoder (empty: none)."""

    encoder: dict[str, Tensor]
    decoder: dict[str, Tensor]


def advpt_names(state: Mapping[str, Tensor]) -> Weights:
    """An MAE release's (or a timm ViT's) state dict under advpt's names; the classifier head left out."""
    encoder: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in COMPUTED or key.startswith("head."):
            continue
        prefix = next((p for p in DECODER_NAMES if key.startswith(p)), None)
        if prefix is None:
            encoder[key] = value
        else:
            decoder[DECODER_NAMES[prefix] + key[len(prefix) :]] = value
    if not any(k.startswith("fc_norm.") for k in encoder):
        encoder = {("fc_" + k if k.startswith("norm.") else k): v for k, v in encoder.items()}
    return Weights(encoder, decoder)


# -- where the weights are ---------------------------------------------------------------------
def shown_source(source: str) -> str:
    """A source as the user would type it (a file relative to the working directory)."""
    from advpt.runs import shown

    return source if source.startswith(TIMM) else shown(Path(source))


def resolve_source(value: Any, what: str) -> str:
    """``timm:NAME`` (a timm model with pretrained weights) or a weights file as an absolute path."""
    text = str(value)
    if text.startswith(TIMM):
        import timm

        name = text[len(TIMM) :]
        if not timm.is_model(name):
            raise UserError(f"{what}={text}: timm has no model {name!r} (see timm.list_pretrained('vit_*'))")
        if not timm.is_model_pretrained(name):
            raise UserError(f"{what}={text}: timm has no pretrained weights for {name!r}")
        return text
    path = Path(text).expanduser().resolve()
    if path.is_dir() and (path / "encoder.safetensors").is_file():  # an advpt pretrain run
        path = path / "encoder.safetensors"
    if not path.exists():
        raise UserError(f"{what}={text} does not exist (give {ACCEPTED})")
    if not path.is_file() or path.suffix.lower() not in RELEASE_SUFFIXES + ADVPT_SUFFIXES:
        raise UserError(f"{what}={text} is not {ACCEPTED}")
    return str(path)


def read_weights(source: str, what: str, shapes_only: bool = False) -> Weights:
    """The weights ``source`` names, under advpt's names. ``shapes_only``: a timm model's come from
    its architecture (on the meta device), nothing downloaded; a file is read either way."""
    if source.startswith(TIMM):
        return advpt_names(_timm_state(source[len(TIMM) :], what, shapes_only))
    path = Path(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return advpt_names(load_file(str(path)))
        except Exception as e:
            raise UserError(
                f"{what}={path} is not a readable safetensors file ({type(e).__name__})"
            ) from None
    if path.suffix == ".ckpt":
        return _pretrain_checkpoint(path, what)
    return advpt_names(_release_state(path, what))


def _release_state(path: Path, what: str) -> dict[str, Tensor]:
    """``{'model': state_dict}`` (the MAE release's layout) or a bare state dict."""
    ckpt = load_checkpoint(path, what)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"{what}={path} is not in the MAE release layout ({{'model': state_dict}}, tensors by name)"
        )
    return dict(state)


def _pretrain_checkpoint(path: Path, what: str) -> Weights:
    """An ``advpt pretrain`` ``last.ckpt``: its encoder, and its decoder when its method has one."""
    ckpt = load_checkpoint(path, what)
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        state = {}

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    encoder = part("encoder.vit.")
    if not encoder:
        raise UserError(f"{what}={path} is not a checkpoint of `advpt pretrain` (no encoder.vit.* weights)")
    return Weights(encoder, part("decoder."))


def _timm_state(name: str, what: str, shapes_only: bool) -> dict[str, Tensor]:
    import timm

    try:
        if shapes_only:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False).state_dict()
        # Downloaded where the network allows, else read from the local Hugging Face cache.
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"{what}={TIMM}{name}: timm could not load its weights ({type(e).__name__}: {reason}); "
            "without a network they are read from the Hugging Face cache (HF_HUB_OFFLINE=1 skips the network)"
        ) from None


def timm_model(source: str) -> dict[str, Any]:
    """The model config (name, img_size, patch_size, kwargs) of ``timm:NAME``'s own architecture."""
    import timm
    from timm.models import split_model_name_tag

    name = source[len(TIMM) :]
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False)
    return {
        "name": split_model_name_tag(name)[0],
        "img_size": int(vit.patch_embed.img_size[0]),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "kwargs": {},
    }


# -- whether they fit the model ----------------------------------------------------------------
def meta_vit(model: Mapping[str, Any]) -> nn.Module:
    """``model=``'s ViT, shapes only (advpt's Encoder keeps its state-dict names)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
    except Exception as e:  # an unknown architecture or argument
        raise UserError(f"cannot build the model {model['name']} ({e})") from None


def first_difference(
    given: Mapping[str, Tensor], wanted: Mapping[str, Tensor], resizable: Iterable[str] = ()
) -> str | None:
    """The first weight, in the model's order, that is missing or differs in shape; then any extra one."""
    for key, value in wanted.items():
        if key not in given:
            return f"it has no {key}"
        if given[key].shape != value.shape and key not in resizable:
            return f"its {key} has shape {list(given[key].shape)}, the model's {list(value.shape)}"
    extra = next((k for k in given if k not in wanted), None)
    return f"it has {extra}, which the model has not" if extra else None


def _source_grid(given: Tensor | None, vit: nn.Module) -> tuple[int, int] | None:
    """The square patch grid of a position embedding that differs from ``vit``'s only in its length."""
    wanted = getattr(vit, "pos_embed", None)
    if given is None or wanted is None or given.ndim != 3:
        return None
    if (given.shape[0], given.shape[2]) != (wanted.shape[0], wanted.shape[2]):
        return None
    prefix = wanted.shape[1] - vit.patch_embed.num_patches
    side = math.isqrt(max(given.shape[1] - prefix, 0))
    return (side, side) if side and side * side == given.shape[1] - prefix else None


def check_encoder(
    encoder: Mapping[str, Tensor], vit: nn.Module, model: Mapping[str, Any], what: str, source: str
) -> tuple[int, int] | None:
    """One line if ``encoder`` does not fit ``vit`` (``model=``'s); else the grid its position
    embedding is resampled from (``None``: the same grid)."""
    grid = _source_grid(encoder.get("pos_embed"), vit)
    wanted = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    problem = first_difference(encoder, wanted, resizable=("pos_embed",) if grid else ())
    if problem:
        described = (
            f"{model['name']} ({model['img_size']} px, patch {model['patch_size']}, "
            f"width {vit.embed_dim}, depth {len(vit.blocks)})"
        )
        raise UserError(
            f"{what}={shown_source(source)} does not fit the model {described}: {problem}; "
            "choose the model= it was made for"
        )
    return grid if grid is not None and grid != tuple(vit.patch_embed.grid_size) else None


# -- loading -------------------------------------------------------------------------------------
def load_encoder(
    vits: Iterable[nn.Module], encoder: Mapping[str, Tensor], model: Mapping[str, Any], what: str, source: str
) -> list[str]:
    """Load ``encoder`` into each ViT (all alike: the encoder and any copy a method keeps), strictly but
    for the head; the position embedding resampled to the model's grid if needed. Returns what to say."""
    from timm.layers import resample_abs_pos_embed

    notes: list[str] = []
    for vit in vits:
        state = dict(encoder)
        grid = check_encoder(state, vit, model, what, source)
        if grid is not None:
            new = tuple(vit.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"].float(),
                list(new),
                list(grid),
                num_prefix_tokens=vit.pos_embed.shape[1] - vit.patch_embed.num_patches,
            )
            note = (
                f"resampled the position embedding of {what}={shown_source(source)} from {grid[0]}x{grid[1]} "
                f"to {new[0]}x{new[1]} patches (img_size={model['img_size']}); every other weight as it is"
            )
            if note not in notes:  # said once, however many copies of the encoder
                notes.append(note)
        missing, unexpected = vit.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
        if bad:  # check_encoder has compared every name: this would be a bug
            raise UserError(f"{what}={shown_source(source)} does not fit the model ({bad[0]})")
    return notes

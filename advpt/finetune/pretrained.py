"""Where a fine-tuning run's encoder comes from: ``pretrained=`` resolved, checked and loaded.

A pretrain run directory, its ``encoder.safetensors`` (+ ``encoder.json``) or ``checkpoints/last.ckpt``,
``latest`` or ``none``; every weight the ViT needs must be there with its shape, the head excepted.
Weights made elsewhere (an MAE release ``.pth``, ``timm:NAME``) load into ``model=`` (advpt.published).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from advpt.config import CONF_DIR
from advpt.errors import UserError
from advpt.models import model_config, timm_kwargs
from advpt.published import (
    TIMM,
    check_encoder,
    load_encoder,
    meta_vit,
    read_weights,
    shown_source,
    timm_model,
)
from advpt.trust import load_checkpoint, refuse_loading_kwargs


@dataclass(frozen=True)
class Pretrained:
    """The weights file to start from (``None``: from scratch) and the model config that built it."""

    path: Path | None
    model: dict[str, Any]


def find_latest() -> Path:
    """``pretrained=latest``: the encoder of the newest finished pretrain run here (``advpt.runs``)."""
    from advpt.runs import resolve_latest_input

    return resolve_latest_input("finetune").resolve()


def _checkpoint_encoder(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A pretrain checkpoint's ``encoder.vit.*`` weights under timm's names, and its model config."""
    ckpt = load_checkpoint(path, "pretrained")
    prefix = "encoder.vit."
    try:
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        model = ckpt["hyper_parameters"]["model"]
        refuse_loading_kwargs(model.get("kwargs") or {}, f"pretrained={path}")
        if state:
            return state, model_config(model["name"], timm_kwargs(model))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # not an advpt pretrain checkpoint
        pass
    raise UserError(f"pretrained={path} is not a checkpoint of `advpt pretrain` (no encoder.vit.* weights)")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # safe_open is not iterable, hence keys()
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise UserError(
            f"pretrained={path} is not a readable safetensors file ({type(e).__name__})"
        ) from None


def _check_matches(path: Path, shapes: Mapping[str, tuple[int, ...]], model: Mapping[str, Any]) -> None:
    """Every weight the ViT needs is there with its shape; the head is the only part left out."""
    import timm

    try:
        with torch.device("meta"):  # shapes only, nothing allocated
            vit = timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
    except Exception as e:  # an unknown architecture or argument
        raise UserError(f"pretrained={path}: cannot build its model {model['name']} ({e})") from None
    wanted = {k: tuple(v.shape) for k, v in vit.state_dict().items() if not k.startswith("head.")}
    given = {k: s for k, s in shapes.items() if not k.startswith("head.")}
    missing, unexpected = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    wrong = sorted(k for k in wanted.keys() & given.keys() if wanted[k] != given[k])
    if missing:
        what = f"missing {missing[0]}"
    elif unexpected:
        what = f"unexpected {unexpected[0]}"
    elif wrong:
        what = f"{wrong[0]} has shape {list(given[wrong[0]])}, the model wants {list(wanted[wrong[0]])}"
    else:
        return
    raise UserError(f"pretrained={path} does not fit its model {model['name']} ({what})")


def resolve_pretrained(value: Any) -> Pretrained:
    """Turn ``pretrained=`` into the file to read and its model config; one line on anything unusable."""
    text = "none" if value is None else str(value)
    if text.lower() == "none":
        return Pretrained(None, {})
    path = find_latest() if text == "latest" else Path(text).expanduser().resolve()
    if not path.exists():
        raise UserError(
            f"pretrained={text} does not exist (give a pretrain run directory, its encoder.safetensors or "
            "checkpoints/last.ckpt, latest or none)"
        )
    if path.is_dir():
        for candidate in (path / "encoder.safetensors", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise UserError(
                f"pretrained={text} is a folder without encoder.safetensors or checkpoints/last.ckpt "
                "(is it an `advpt pretrain` run directory?)"
            )
    if path.suffix == ".ckpt":
        state, model = _checkpoint_encoder(path)
        _check_matches(path, {k: tuple(v.shape) for k, v in state.items()}, model)
        return Pretrained(path, model)
    if path.suffix == ".safetensors":
        spec_file = path.with_name("encoder.json")
        if not spec_file.is_file():
            raise UserError(f"pretrained={text} has no encoder.json beside it (written by `advpt pretrain`)")
        try:
            spec = json.loads(spec_file.read_text())
            refuse_loading_kwargs(spec["kwargs"], str(spec_file))
            model = model_config(spec["name"], spec["kwargs"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{spec_file} is not an encoder description (name, kwargs)") from None
        _check_matches(path, _safetensors_shapes(path), model)
        return Pretrained(path, model)
    raise UserError(
        f"pretrained={text} is not a pretrain run directory, an encoder .safetensors or a Lightning .ckpt "
        "(nor an MAE release .pth or timm:NAME)"
    )


def published_model(source: str, given: Any) -> dict[str, Any]:
    """The model that weights made elsewhere load into: ``model=`` (a ``.pth`` holds no architecture),
    else ``timm:NAME``'s own; checked against their shapes (nothing downloaded)."""
    encoder = read_weights(source, "pretrained", shapes_only=True).encoder  # a bad file: refused first
    if given is not None:
        model = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given)
    elif source.startswith(TIMM):
        model = timm_model(source)
    else:
        options = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("vit_*.yaml")))
        raise UserError(
            f"pretrained={shown_source(source)} holds weights without their architecture: "
            f"name it with model= (one of {options})"
        )
    model = model_config(model["name"], timm_kwargs(model))
    check_encoder(encoder, meta_vit(model), model, "pretrained", source)
    return model


def load_published(vit: nn.Module, source: str, model: Mapping[str, Any]) -> list[str]:
    """Load weights made elsewhere into ``vit`` (the head left fresh); returns what to say about it."""
    return load_encoder([vit], read_weights(source, "pretrained").encoder, model, "pretrained", source)


def load_encoder_state(path: Path) -> dict[str, Tensor]:
    """The encoder's timm state dict from ``encoder.safetensors`` or a pretrain ``last.ckpt``."""
    if path.suffix == ".ckpt":
        return _checkpoint_encoder(path)[0]
    from safetensors.torch import load_file

    return load_file(str(path))


def load_backbone(vit: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load everything but the head, strictly: a missing or extra encoder weight is an error."""
    missing, unexpected = vit.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False
    )
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise UserError(f"the pre-trained weights do not fit the model ({bad[0]})")

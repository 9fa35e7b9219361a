"""The fine-tuned classifier to evaluate: ``checkpoint=`` resolved, its ``model.json`` checked, loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from advpt.errors import UserError
from advpt.trust import refuse_loading_kwargs


def resolve_checkpoint(value: Any) -> Path:
    """The ``model.safetensors`` that ``checkpoint=`` names (a fine-tuning run directory, the file, or latest)."""
    if value is None or str(value) == "latest":
        from advpt.runs import resolve_latest_input

        return resolve_latest_input("evaluate")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint={value} does not exist (give a fine-tuning run directory or its model.safetensors)"
        )
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        if (path / "encoder.safetensors").is_file():
            raise UserError(_pretrained_only(value))
        raise UserError(f"checkpoint={value} holds no model.safetensors (give a fine-tuning run directory)")
    if path.name == "encoder.safetensors":
        raise UserError(_pretrained_only(value))
    if path.suffix != ".safetensors":
        raise UserError(
            f"checkpoint={value} is not a fine-tuned model: give a fine-tuning run directory or its model.safetensors"
        )
    return path


def _pretrained_only(value: Any) -> str:
    return (
        f"checkpoint={value} is a pre-trained encoder without a classifier head; "
        f"fine-tune it first (advpt finetune pretrained={value})"
    )


def read_spec(weights: Path) -> dict[str, Any]:
    """``model.json`` beside ``weights``, checked against the weights' classifier head."""
    from safetensors import SafetensorError, safe_open

    not_model = f"checkpoint={weights} is not a fine-tuned model"
    # <name>.json describes <name>.safetensors; a renamed copy in a run directory falls back on model.json.
    spec_path = next(
        (p for p in (weights.with_suffix(".json"), weights.parent / "model.json") if p.is_file()), None
    )
    if spec_path is None:
        raise UserError(f"{not_model}: model.json is missing beside it")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{not_model}: cannot read {spec_path} ({e})") from None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("kwargs"), dict)
    ):
        raise UserError(f'{not_model}: {spec_path} lacks the timm "name" and "kwargs" of the model')
    refuse_loading_kwargs(spec["kwargs"], str(spec_path))
    classes = spec.get("num_classes", spec["kwargs"].get("num_classes"))
    if not isinstance(classes, int) or classes < 1:
        raise UserError(f"{not_model}: {spec_path} gives no num_classes >= 1 (an encoder without a head?)")
    try:
        with safe_open(str(weights), "pt") as f:
            names = set(f.keys())
            head = f.get_slice("head.weight").get_shape() if "head.weight" in names else None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{not_model}: cannot read it as safetensors ({e})") from None
    if head is None or head[0] != classes:
        raise UserError(f"{not_model}: it has no {classes}-way head.weight as {spec_path.name} says")
    return {**spec, "num_classes": classes}


def image_size(spec: Mapping[str, Any]) -> int:
    """The side in pixels the model reads (``model.json``'s ``img_size``)."""
    size = spec["kwargs"].get("img_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def load_classifier(weights: Path, spec: Mapping[str, Any]) -> nn.Module:
    """The fine-tuned timm ViT (reading [0,1] pixels), in eval mode with frozen parameters."""
    from safetensors.torch import load_file

    from advpt.models import Encoder

    model = Encoder(spec["name"], {**spec["kwargs"], "num_classes": spec["num_classes"]})
    try:
        model.vit.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise UserError(
            f"checkpoint={weights} does not match its model.json ({spec['name']}): {first}"
        ) from None
    return model.eval().requires_grad_(False)

"""An encoder without a classifier head, scored by kNN: ``checkpoint=`` resolved to its weights, model and
data, the ``knn`` settings checked, the score as ``results.json`` records it.

The encoder is an ``advpt pretrain`` run (its directory or ``encoder.safetensors`` with ``encoder.json``),
``timm:NAME`` or an MAE release ``.pth`` with ``model=`` (:mod:`advpt.published`, as ``advpt finetune
pretrained=`` reads them). Its data: ``data=`` when given, else the pre-training run's ``config.yaml``,
else the built-in digits; ``data_root=`` moves it. The measurement is the pre-training monitor's
(:class:`advpt.evaluate.knn.KnnProbe`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from advpt.attacks import Attack
from advpt.config import CONF_DIR, parse_number, positive_int
from advpt.errors import UserError
from advpt.models import Encoder, architecture, model_config, timm_kwargs
from advpt.names import NORMS
from advpt.published import TIMM, is_published, shown_source
from advpt.trust import refuse_loading_kwargs, refuse_programs

WHAT = "checkpoint"  # the setting named in every message
RUN_CONFIG = "config.yaml"  # beside encoder.safetensors in a pretrain run: the data it trained on


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder's weights are (an absolute path or ``timm:NAME``), the model config they load
    into (name, img_size, patch_size, kwargs) and the pre-training run they came from, if any."""

    source: str
    model: dict[str, Any]
    run: Path | None = None

    @property
    def image_size(self) -> int:
        return int(self.model["img_size"])


def is_encoder(value: Any) -> bool:
    """Whether ``checkpoint=`` names an encoder without a classifier head rather than a fine-tuned model."""
    text = str(value)
    if value is None or text == "latest":
        return False
    if is_published(text):
        return True
    path = Path(text).expanduser()
    if path.is_dir():
        return (path / "encoder.safetensors").is_file() and not (path / "model.safetensors").is_file()
    return path.name == "encoder.safetensors"


def _as_dict(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)  # type: ignore[return-value]


def _group(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model group as given (``model=``, timm's own) in the form ``encoder.json`` is read into."""
    return model_config(str(model["name"]), timm_kwargs(model))


def resolve_encoder(value: Any, given_model: Any = None) -> EncoderSource:
    """``checkpoint=`` as an encoder and the model it loads into; one line on anything unusable."""
    from advpt.published import resolve_source, timm_model

    text = str(value)
    given = None if given_model is None else _as_dict(given_model)
    if text.startswith(TIMM):
        source = resolve_source(text, WHAT)
        return EncoderSource(source, _group(given if given is not None else timm_model(source)))
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        raise UserError(
            f"{WHAT}={text} does not exist (give a pre-training run directory or its encoder.safetensors, "
            "timm:NAME, or an MAE release .pth with model=)"
        )
    if is_published(text):  # a release .pth holds no architecture
        if given is None:
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("vit_*.yaml")))
            raise UserError(
                f"{WHAT}={shown_source(str(path))} holds weights without their architecture: "
                f"name it with model= (one of {options})"
            )
        return EncoderSource(str(path), _group(given))
    spec_file = path.with_name("encoder.json")
    if not spec_file.is_file():
        raise UserError(
            f"{WHAT}={text} is a pre-trained encoder without a classifier head, scored by kNN, but "
            "encoder.json is missing beside it (`advpt pretrain` writes both)"
        )
    try:
        spec = json.loads(spec_file.read_text())
        refuse_loading_kwargs(spec["kwargs"], str(spec_file))
        model = model_config(spec["name"], spec["kwargs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{spec_file} is not an encoder description (name, kwargs)") from None
    if given is not None and architecture(given) != architecture(model):
        raise UserError(
            f"model={given['name']} (img_size {given['img_size']}) is not the architecture of {WHAT}={text} "
            f"({model['name']}, img_size {model['img_size']}): leave model= out, it is read from encoder.json"
        )
    run = path.parent if (path.parent / RUN_CONFIG).is_file() else None
    return EncoderSource(str(path), model, run)


def check_fits(encoder: EncoderSource) -> None:
    """One line if the weights do not fit the model (shapes only; timm's are not downloaded)."""
    from advpt.published import check_encoder, meta_vit, read_weights

    weights = read_weights(encoder.source, WHAT, shapes_only=True).encoder
    check_encoder(weights, meta_vit(encoder.model), encoder.model, WHAT, encoder.source)


def load(encoder: EncoderSource) -> tuple[Encoder, list[str]]:
    """The encoder (reading [0,1] pixels) in eval mode with frozen parameters, and what to say about it
    (a resampled position embedding)."""
    from advpt.published import load_encoder, read_weights

    model = Encoder.from_config(encoder.model)
    weights = read_weights(encoder.source, WHAT).encoder
    notes = load_encoder([model.vit], weights, encoder.model, WHAT, encoder.source)
    return model.eval().requires_grad_(False), notes


def encoder_data(encoder: EncoderSource, given: Any, data_root: Any) -> tuple[dict[str, Any], str | None]:
    """The data config to score ``encoder`` on, and a note when it falls back on the built-in digits.

    ``data=`` wins; else the pre-training run's ``config.yaml``, whose locations must not run a program
    (only ``data_root`` typed on the command line may name one, :mod:`advpt.trust`).
    """
    note = None
    if given is not None:
        data = _as_dict(given)
    elif encoder.run is not None:
        origin = encoder.run / RUN_CONFIG
        try:
            recorded = yaml.safe_load(origin.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(
                f"cannot read the encoder's data config {origin} ({type(e).__name__}); pass data=NAME"
            ) from None
        data = recorded.get("data") if isinstance(recorded, dict) else None
        if not isinstance(data, dict) or "name" not in data:
            raise UserError(f"{origin} records no data config (data.name); pass data=NAME")
        refuse_programs(
            data,
            str(origin),
            typed=("root",) if data_root is not None else (),
            hint=" (type data_root=LOCATION if you trust it)",
        )
        data = dict(data)
    else:
        data = dict(yaml.safe_load((CONF_DIR / "data" / "builtin.yaml").read_text()))
        note = (
            f"{WHAT}={shown_source(encoder.source)} records no data: kNN on the built-in digits "
            "(choose another with data=NAME)"
        )
    if data_root is not None:
        data["root"] = str(data_root)
    return data, note


# -- the knn settings and the score ------------------------------------------------------------------
@dataclass(frozen=True)
class KnnSettings:
    """``knn.*`` checked: the classifier, the bank and queries, the feature-space attack."""

    k: int
    temperature: float
    bank_size: int | None
    max_queries: int | None
    batch_size: int
    robust: bool
    attack: Attack


def knn_settings(knn: Any) -> KnnSettings:
    """``knn.*`` as numbers; one line naming the first bad one."""

    def optional(key: str) -> int | None:
        return None if knn[key] is None else positive_int(knn[key], f"knn.{key}")

    if knn.enabled is not None and not isinstance(knn.enabled, bool):
        raise UserError(f"knn.enabled={knn.enabled} is invalid: expected true, false or null")
    if not isinstance(knn.robust, bool):
        raise UserError(f"knn.robust={knn.robust} is invalid: expected true or false")
    temperature = parse_number(knn.temperature, "knn.temperature")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"knn.temperature={knn.temperature} is out of range: expected a number > 0")
    if knn.norm not in NORMS:
        raise UserError(f"knn.norm={knn.norm} is invalid: choose one of {', '.join(NORMS)}")
    eps = parse_number(knn.eps, "knn.eps")
    if not (eps >= 0 and math.isfinite(eps)) or (knn.norm == "linf" and eps > 1):
        bound = "between 0 and 1 (written k/255)" if knn.norm == "linf" else "a finite number >= 0"
        raise UserError(f"knn.eps={knn.eps} is out of range: an {knn.norm} radius must be {bound}")
    return KnnSettings(
        k=positive_int(knn.k, "knn.k"),
        temperature=temperature,
        bank_size=optional("bank_size"),
        max_queries=optional("max_queries"),
        batch_size=positive_int(knn.batch_size, "knn.batch_size"),
        robust=knn.robust,
        attack=Attack(str(knn.norm), eps, steps=positive_int(knn.steps, "knn.steps")),
    )


def knn_results(
    encoder: Encoder,
    data: Mapping[str, Any],
    settings: KnnSettings,
    seed: int,
    workers: int,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``results.json``'s ``knn``: the weighted kNN top-1 of ``encoder``'s features, clean and robust,
    the bank the training split and the queries the evaluation split of ``data``, each without augmentation."""
    from advpt.data.sources import build_source
    from advpt.evaluate.knn import Autocast, KnnProbe, bank_and_queries

    size = int(encoder.vit.patch_embed.img_size[0])
    train = build_source(data, train=True, image_size=size)
    evaluation = build_source(data, train=False, image_size=size)
    if train is None or evaluation is None:
        raise UserError(
            f"data {data['name']} at {data.get('root')} has no {'training' if train is None else 'test'} split "
            "for the kNN's bank and queries; pass data_root=PATH"
        )
    bank, queries = bank_and_queries(
        train, evaluation, size, settings.bank_size, settings.max_queries, seed, settings.batch_size
    )
    empty = [name for name, part in (("bank", bank), ("queries", queries)) if len(part) == 0]  # type: ignore[arg-type]
    if empty:
        raise UserError(f"data {data['name']} has no image for the kNN's {empty[0]}")
    probe = KnnProbe(
        bank,
        queries,
        settings.attack,
        settings.k,
        settings.temperature,
        settings.batch_size,
        workers,
        seed,
    )
    device = next(encoder.parameters()).device
    scores = probe.scores(
        encoder, precision=Autocast(device, dtype) if dtype is not None else None, robust=settings.robust
    )
    return {
        "top1": scores.top1,
        "robust_top1": scores.robust_top1,
        "k": settings.k,
        "temperature": settings.temperature,
        "bank": scores.bank,
        "queries": scores.queries,
        "norm": settings.attack.norm,
        "eps": settings.attack.eps,
        "steps": settings.attack.steps,
    }

"""Which sets a suite evaluates.

``auto``: the model's own test split and its generated corruptions; ``imagenet_variants``: every
ImageNet variant found under a root (``advpt.data.variants``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from advpt.data.variants import EvalSet, top1_correct
from advpt.errors import UserError
from advpt.trust import refuse_programs

SUITES = ("auto", "imagenet_variants")
# The headline sets of each suite, as ``EvalSet.group`` names; the average says how many were present.
IMAGENET_SETS = (
    "imagenet_val",
    "imagenet_real",
    "imagenet_v2",
    "imagenet_a",
    "imagenet_r",
    "imagenet_sketch",
    "conflict_stimuli",
    "imagenet_c",
)
CORRUPTIONS_GROUP = "corruptions"

Warn = Callable[[str], None]


def data_config(spec: Mapping[str, Any], data_root: Any = None) -> dict[str, Any]:
    """The data config the model was fine-tuned on (``model.json``), read from ``data_root`` if given.

    A location in model.json that would run a program (``pipe:``, a URL) is refused: only a
    ``data_root`` typed on the command line may name one (``advpt.trust``).
    """
    data = spec.get("data")
    if not isinstance(data, Mapping) or "name" not in data:
        raise UserError(
            "model.json records no data config to evaluate on (suite=auto); use suite=imagenet_variants root=PATH"
        )
    refuse_programs(
        data,
        "the model's model.json",
        typed=("root",) if data_root is not None else (),
        hint=" (type data_root=LOCATION if you trust it)",
    )
    data = dict(data)
    if data_root is not None:
        data["root"] = str(data_root)
    return data


def auto_sets(data: Mapping[str, Any], size: int, seed: int, corruptions: bool) -> list[EvalSet]:
    """The test split of the model's own dataset, then its 75 generated corruption subsets."""
    from advpt.data.corruptions import CORRUPTIONS, SEVERITIES, CorruptedDataset
    from advpt.data.module import Transformed
    from advpt.data.sources import build_source
    from advpt.data.transforms import eval_transform

    source = build_source(data, train=False, image_size=size)
    if source is None:
        raise UserError(
            f"data {data['name']} at {data.get('root')} has no test split "
            "(an ImageFolder needs ROOT/val or ROOT/test); pass data_root=PATH"
        )
    name = str(data["name"])
    clean = Transformed(source, eval_transform(size))
    sets = [EvalSet(name, clean, top1_correct, name)]
    if corruptions:
        sets += [
            EvalSet(
                f"{CORRUPTIONS_GROUP}/{c}/{s}",
                CorruptedDataset(clean, c, s, seed),
                top1_correct,
                CORRUPTIONS_GROUP,
            )
            for c in CORRUPTIONS
            for s in SEVERITIES
        ]
    return sets


def imagenet_sets(root: Path, size: int, crop_pct: float, warn: Warn) -> list[EvalSet]:
    """Every ImageNet variant under ``root``, resized to ``size / crop_pct`` and centre-cropped."""
    from torchvision.transforms import v2 as T

    from advpt.data.transforms import BICUBIC
    from advpt.data.variants import build_imagenet_variants

    transform = T.Compose(
        [
            T.ToImage(),
            T.Resize(math.floor(size / crop_pct), interpolation=BICUBIC, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    return build_imagenet_variants(root, transform, warn=warn)


def capped(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` items: a random subset fixed by ``seed`` (the same indices for every set of a size)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(keep.tolist()))

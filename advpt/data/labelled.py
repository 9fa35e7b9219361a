"""Label-scarce fine-tuning: a seeded, class-balanced subset of a training split.

Self-supervised papers measure where labels are scarce (SimCLR and BYOL fine-tune on 1 % and 10 % of
ImageNet's labels). ``data.labels_per_class=N`` keeps N images of every class, ``data.label_fraction=p``
keeps round(p x n_c) (at least one) of each class's n_c; which ones depends on ``data.labels_seed``
(default: the run's seed) and the split alone, so every arm of a study fine-tuned with one seed sees the
same labelled images and their outcomes pair. The subset is written into the run (``labelled.json``).
Nothing here imports torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.errors import UserError
from advpt.files import write_json

RECORD = "labelled.json"


def wanted(data: Mapping[str, Any]) -> bool:
    """Whether the data config asks for a labelled subset."""
    return data.get("labels_per_class") is not None or data.get("label_fraction") is not None


def check(data: Mapping[str, Any]) -> None:
    """One line for a subset that cannot be drawn (the ranges of N and p are checked with every key's)."""
    per_class, fraction = data.get("labels_per_class"), data.get("label_fraction")
    if per_class is not None and fraction is not None:
        raise UserError(
            "data.labels_per_class and data.label_fraction both given: choose one (N per class, or a fraction)"
        )
    if wanted(data) and data.get("name") == "shards":
        raise UserError(
            "data=shards streams its images: a labelled subset needs an indexed source "
            "(data=imagefolder, cifar10, builtin ...)"
        )


def source_labels(dataset: Any) -> list[int]:
    """Every training item's class, read from the source's index (no image is decoded where it has one)."""
    for key in ("targets", "labels"):
        found = getattr(dataset, key, None)
        if found is not None and len(found) == len(dataset):
            return [int(v) for v in found]
    samples = getattr(dataset, "samples", None)  # ImageFolder
    if samples is not None:
        return [int(label) for _path, label in samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def draw(labels: Sequence[int], per_class: int | None, fraction: float | None, seed: int) -> list[int]:
    """Indices of a class-balanced subset: each class's items in a (seed, class)-seeded order, its first
    N (or round(p x n_c), at least 1) kept; sorted. A class with fewer than N items gives all it has."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    kept: list[int] = []
    for label, items in sorted(by_class.items()):
        order = list(items)
        # Per class, so the images of one class do not depend on how many the other classes have.
        random.Random(f"{seed}:{label}").shuffle(order)
        count = per_class if per_class is not None else max(1, round(float(fraction) * len(items)))
        kept += order[:count]
    return sorted(kept)


def subset(data: Mapping[str, Any], dataset: Any, seed: int) -> tuple[list[int], dict[str, Any]]:
    """The labelled subset of ``dataset`` that ``data`` asks for, and its record (what ``labelled.json``
    holds): the rule, the seed, counts per class, the indices and, where the source has them, file names."""
    labels = source_labels(dataset)
    labels_seed = data.get("labels_seed")
    labels_seed = int(seed if labels_seed is None else labels_seed)
    per_class, fraction = data.get("labels_per_class"), data.get("label_fraction")
    indices = draw(labels, per_class, fraction, labels_seed)
    if not indices:
        raise UserError(f"data={data.get('name')}: the training split is empty, no labelled subset to draw")
    counts: dict[str, int] = {}
    classes = getattr(dataset, "classes", None)
    for i in indices:
        name = str(classes[labels[i]]) if classes is not None else str(labels[i])
        counts[name] = counts.get(name, 0) + 1
    record: dict[str, Any] = {
        "data": data.get("name"),
        "labels_per_class": per_class,
        "label_fraction": fraction,
        "labels_seed": labels_seed,
        "images": len(indices),
        "of": len(labels),
        "per_class": counts,
        "indices": indices,
    }
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        record["files"] = [str(samples[i][0]) for i in indices]
    return indices, record


def write(run_dir: Path, record: Mapping[str, Any]) -> Path:
    return write_json(Path(run_dir) / RECORD, dict(record))


def read(run_dir: Path) -> dict[str, Any]:
    """A run's ``labelled.json`` ({} when it fine-tuned on every label, or the file is unreadable)."""
    import json

    try:
        found = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def described(record: Mapping[str, Any]) -> str:
    """The subset in words: ``100 of 1437 training images (10 per class, seed 0)``."""
    rule = (
        f"{record['labels_per_class']} per class"
        if record.get("labels_per_class") is not None
        else f"{100 * float(record['label_fraction']):g} % of each class"
    )
    return (
        f"{record['images']} of {record['of']} training images ({rule}, labels_seed {record['labels_seed']})"
    )


def steps_per_epoch(images: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps in one epoch of ``images`` (the training loader drops a last partial batch when there
    is at least one whole one; every process takes the same count)."""
    per_rank = images // world if world > 1 else images
    return max(1, per_rank // batch_size if per_rank >= batch_size else 1)


def epochs_for(min_steps: int, per_epoch: int) -> int:
    return max(1, math.ceil(min_steps / per_epoch))

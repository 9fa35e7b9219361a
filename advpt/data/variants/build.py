"""``build_imagenet_variants``: an ``EvalSet`` per ImageNet evaluation set found under one root.

A missing set is skipped with one ``warn(...)`` line naming the path(s) looked for (the folder names are in
``folders``). Labels are always ImageNet-1k indices, except IN-V2 (label = ``int(folder name)``) and the
cue-conflict stimuli (label = index of the shape category in the alphabetically sorted 16 categories).
ReaL labels are matched to the val images by file number; which predictions count as correct is in ``correct``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from advpt.data.variants.correct import (
    conflict_correct,
    real_correct,
    real_valid,
    subset_correct,
    top1_correct,
)
from advpt.data.variants.evalset import EvalSet
from advpt.data.variants.folders import (
    FOLDERS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_SEVERITIES,
    REAL_JSON,
    _find,
    _int_label,
    _looked_for,
    _scan,
    _wnid_label,
)
from advpt.data.variants.images import LabeledImages, MultiLabelImages
from advpt.data.variants.labels import (
    _timm_info,
    conflict_categories,
    imagenet_synsets,
    subset_indices,
    wnid_to_index,
)

_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)", re.IGNORECASE)


def build_imagenet_variants(
    root: str | Path,
    transform: Callable[[Image.Image], Tensor],
    warn: Callable[[str], None] = warnings.warn,
) -> list[EvalSet]:
    """Every evaluation set present under ``root``; each absent one is skipped with a single ``warn``."""
    root = Path(root)
    sets: list[EvalSet] = []

    def folder_set(
        name: str,
        label_of: Callable[[str], Any | None],
        correct: Callable[[Tensor, Tensor], Tensor],
        classes: list[str] | None = None,
    ) -> list[tuple[Path, Any]] | None:
        folder = _find(root, FOLDERS[name])
        if folder is None:
            warn(f"{name}: skipped, folder not found (looked for {_looked_for(root, FOLDERS[name])})")
            return None
        try:
            samples, unknown = _scan(folder, label_of)
        except OSError as e:  # unreadable folder: report it, keep evaluating the other sets
            warn(f"{name}: skipped, could not read {folder}: {e}")
            return None
        if unknown:
            # Stray folders (e.g. a README dir, a class outside the set) are ignored, not fatal.
            warn(f"{name}: ignored {len(unknown)} unrecognised class folder(s) in {folder}: {unknown[:5]}")
        if not samples:
            warn(f"{name}: skipped, no images found under {folder}")
            return None
        sets.append(
            EvalSet(name, LabeledImages(samples, transform), correct, name, path=folder, classes=classes)
        )
        return samples

    val_samples = folder_set("imagenet_val", _wnid_label, top1_correct)
    _add_real(root, val_samples, transform, warn, sets)
    folder_set("imagenet_v2", _int_label, top1_correct)
    for which in ("a", "r"):
        allowed = set(subset_indices(which))
        wnids = imagenet_synsets()

        def label_of(n: str, allowed=allowed) -> int | None:
            i = wnid_to_index().get(n)
            return i if i in allowed else None

        folder_set(
            f"imagenet_{which}", label_of, subset_correct(allowed), [wnids[i] for i in sorted(allowed)]
        )
    folder_set("imagenet_sketch", _wnid_label, top1_correct)
    cats = list(conflict_categories())
    folder_set("conflict_stimuli", {c: i for i, c in enumerate(cats)}.get, conflict_correct, cats)
    _add_imagenet_c(root, transform, warn, sets)
    return sets


def _add_real(
    root: Path,
    val_samples: list[tuple[Path, int]] | None,
    transform: Callable[[Image.Image], Tensor],
    warn: Callable[[str], None],
    sets: list[EvalSet],
) -> None:
    if val_samples is None:
        warn(
            f"imagenet_real: skipped, needs the ImageNet val images (looked for {_looked_for(root, FOLDERS['imagenet_val'])})"
        )
        return
    real_path = root / REAL_JSON
    if not real_path.is_file():
        real_path = _timm_info("imagenet_real_labels.json")
    if not real_path.is_file():
        warn(f"imagenet_real: skipped, no labels at {root / REAL_JSON} nor in timm ({real_path})")
        return
    try:
        real: list[list[int]] = json.loads(real_path.read_text())
    except (OSError, ValueError) as e:
        warn(f"imagenet_real: skipped, could not read {real_path}: {e}")
        return
    samples, unmatched = [], 0
    for path, _ in val_samples:
        # real.json is ordered by val file number: ILSVRC2012_val_00000001.JPEG is entry 0.
        m = _VAL_NUMBER.search(path.name)
        k = int(m.group(1)) - 1 if m else -1
        if 0 <= k < len(real):
            samples.append((path, list(real[k])))
        else:
            unmatched += 1
    if unmatched:
        warn(
            f"imagenet_real: {unmatched} val image(s) not named ILSVRC2012_val_<n> within {real_path}; left out"
        )
    if not samples:
        warn(f"imagenet_real: skipped, no val image matched an entry of {real_path}")
        return
    sets.append(
        EvalSet(
            "imagenet_real",
            MultiLabelImages(samples, transform),
            real_correct,
            "imagenet_real",
            valid=real_valid,
            path=real_path,
        )
    )


def _add_imagenet_c(
    root: Path,
    transform: Callable[[Image.Image], Tensor],
    warn: Callable[[str], None],
    sets: list[EvalSet],
) -> None:
    folder = _find(root, FOLDERS["imagenet_c"])
    if folder is None:
        warn(f"imagenet_c: skipped, folder not found (looked for {_looked_for(root, FOLDERS['imagenet_c'])})")
        return
    missing = []
    for corruption in IMAGENET_C_CORRUPTIONS:
        for severity in IMAGENET_C_SEVERITIES:
            sub = folder / corruption / str(severity)
            try:
                samples = _scan(sub, _wnid_label)[0] if sub.is_dir() else []
            except OSError:  # counted as missing below rather than aborting the whole build
                samples = []
            if not samples:
                missing.append(f"{corruption}/{severity}")
                continue
            name = f"imagenet_c/{corruption}/{severity}"
            sets.append(
                EvalSet(name, LabeledImages(samples, transform), top1_correct, "imagenet_c", path=sub)
            )
    if len(missing) == len(IMAGENET_C_CORRUPTIONS) * len(IMAGENET_C_SEVERITIES):
        warn(f"imagenet_c: skipped, no <corruption>/<severity>/<wnid>/ images under {folder}")
    elif missing:
        warn(f"imagenet_c: {len(missing)} of 75 subsets missing under {folder} (e.g. {missing[:3]})")

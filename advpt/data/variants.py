"""ImageNet evaluation variants read from their published folder layouts.

``build_imagenet_variants(root, transform)`` looks for each set below under one ``root`` and returns an
``EvalSet`` per set found; a missing set is skipped with one ``warn(...)`` line naming the path(s) looked for.
Folder names are the ones the published archives extract to; the aliases after them are also accepted
(first match wins):

* ``imagenet_val``: ``val/<wnid>/*.JPEG`` (ILSVRC2012 val in ImageFolder layout); alias ``imagenet/val``.
* ``imagenet_real``: the ``imagenet_val`` images + ReaL labels (google-research/reassessed-imagenet
  ``real.json``) from ``root/real.json``, else the copy timm ships (``timm/data/_info/imagenet_real_labels.json``).
* ``imagenet_v2``: ``imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg`` (what
  ``imagenetv2-matched-frequency.tar.gz`` extracts to); aliases
  ``imagenetv2/imagenetv2-matched-frequency-format-val``, ``imagenetv2-matched-frequency``.
* ``imagenet_a``: ``imagenet-a/<wnid>/*.jpg`` (``imagenet-a.tar``); alias ``ImageNet-A``.
* ``imagenet_r``: ``imagenet-r/<wnid>/*.jpg`` (``imagenet-r.tar``); alias ``ImageNet-R``.
* ``imagenet_sketch``: ``sketch/<wnid>/*.JPEG`` (what ``ImageNet-Sketch.zip`` extracts to); aliases
  ``imagenet-sketch``, ``imagenet-sketch/sketch``, ``ImageNet-Sketch``, ``imagenet_sketch``.
* ``conflict_stimuli``: ``cue-conflict/<category>/*.png`` (model-vs-human's name for texture-vs-shape's
  ``stimuli/style-transfer-preprocessed-512``); aliases ``conflict_stimuli``, ``style-transfer-preprocessed-512``.
* ``imagenet_c/<corruption>/<severity>``: ``imagenet-c/<corruption>/<1..5>/<wnid>/*.JPEG`` (the Zenodo
  tarballs ``noise.tar``, ``blur.tar``, ... extracted side by side); aliases ``ImageNet-C``, ``imagenet_c``.

Labels are always ImageNet-1k indices (``timm``'s ``imagenet_synsets.txt``, i.e. sorted wnids), except
IN-V2 (label = ``int(folder name)``) and the cue-conflict stimuli (label = index of the shape category in the
alphabetically sorted 16 categories). Scoring, via ``EvalSet.correct(logits [B,1000], target) -> bool [B]``:

* plain top-1 for val, V2, Sketch, IN-C;
* IN-A / IN-R: only the 200 classes of the set compete (timm's ``imagenet_{a,r}_indices.txt``);
* ReaL: target is a multi-hot bool ``[B,1000]``; correct if the argmax is in the ReaL set. Images with an
  empty ReaL set are excluded: ``correct`` is False for them and ``EvalSet.valid(target)`` is False, so
  accuracy = ``correct.sum() / valid.sum()`` (``valid`` is all-True for every other set; ``EvalSet.tally``
  does this count);
* cue-conflict: Geirhos et al.'s 16-class decision -- mean softmax probability over each category's ImageNet
  classes, argmax over the 16. The mapping ``_info/conflict_stimuli_16class.json`` is the ``<category>_indices``
  lists of ``HumanCategories`` in ``modelvshuman/helper/human_categories.py`` (bethgelab/model-vs-human),
  identical to ``code/helper/human_categories.py`` in rgeirhos/texture-vs-shape.

All 75 IN-C subsets share ``group == "imagenet_c"``; ``group_mean`` averages them into one number.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from advpt.data.corruptions import CORRUPTIONS

NUM_CLASSES = 1000
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_C_CORRUPTIONS = CORRUPTIONS  # the same 15, in the published order
IMAGENET_C_SEVERITIES = (1, 2, 3, 4, 5)

# Conventional folder name first, then accepted aliases.
FOLDERS: dict[str, tuple[str, ...]] = {
    "imagenet_val": ("val", "imagenet/val"),
    "imagenet_v2": (
        "imagenetv2-matched-frequency-format-val",
        "imagenetv2/imagenetv2-matched-frequency-format-val",
        "imagenetv2-matched-frequency",
    ),
    "imagenet_a": ("imagenet-a", "ImageNet-A"),
    "imagenet_r": ("imagenet-r", "ImageNet-R"),
    "imagenet_sketch": (
        "sketch",
        "imagenet-sketch",
        "imagenet-sketch/sketch",
        "ImageNet-Sketch",
        "imagenet_sketch",
    ),
    "conflict_stimuli": ("cue-conflict", "conflict_stimuli", "style-transfer-preprocessed-512"),
    "imagenet_c": ("imagenet-c", "ImageNet-C", "imagenet_c"),
}
REAL_JSON = "real.json"

_INFO = Path(__file__).parent / "_info"
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)", re.IGNORECASE)


def _all_valid(target: Tensor) -> Tensor:
    return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)


@dataclass
class EvalSet:
    """One evaluation set: a dataset of ``(image, target)`` and how to score 1000-way logits on it."""

    name: str
    dataset: Dataset
    correct: Callable[[Tensor, Tensor], Tensor]
    group: str
    # Which rows count towards the accuracy (only ReaL excludes any); accuracy = correct.sum() / valid.sum().
    valid: Callable[[Tensor], Tensor] = _all_valid
    path: Path | None = None
    classes: list[str] | None = None

    def tally(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """(number correct, number counted) for one batch."""
        return int(self.correct(logits, target).sum()), int(self.valid(target).sum())


class LabeledImages(Dataset):
    """A list of ``(path, target)``; images are opened lazily, converted to RGB, then ``transform``-ed."""

    def __init__(self, samples: Sequence[tuple[Path, Any]], transform: Callable[[Image.Image], Any] | None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), self._target(target)

    def _target(self, target: Any) -> Any:
        return target


class MultiLabelImages(LabeledImages):
    """Samples whose target is a list of class indices, returned as a multi-hot bool ``[num_classes]``."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, list[int]]],
        transform: Callable[[Image.Image], Any] | None,
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__(samples, transform)
        self.num_classes = num_classes

    def _target(self, target: list[int]) -> Tensor:
        # Built per item: a 50000 x 1000 table up front would cost 50 MB per worker.
        hot = torch.zeros(self.num_classes, dtype=torch.bool)
        hot[list(target)] = True
        return hot


# --------------------------------------------------------------------------------------------- label files
def _timm_info(name: str) -> Path:
    # Locate timm's data files without importing timm (importing it loads every model definition).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"timm is not installed; it ships {name}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / name


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (timm's ``imagenet_synsets.txt``)."""
    return tuple(_read_lines(_timm_info("imagenet_synsets.txt")))


@cache
def wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_synsets())}


@cache
def subset_indices(which: str) -> tuple[int, ...]:
    """The 200 ImageNet-1k indices of IN-A (``which="a"``) or IN-R (``"r"``), from timm's files."""
    return tuple(int(x) for x in _read_lines(_timm_info(f"imagenet_{which}_indices.txt")))


@cache
def conflict_categories() -> dict[str, tuple[int, ...]]:
    """Geirhos' 16 categories (sorted) -> their ImageNet-1k indices."""
    raw = json.loads((_INFO / "conflict_stimuli_16class.json").read_text())
    return {k: tuple(raw[k]) for k in sorted(raw)}


# ----------------------------------------------------------------------------------------------- scoring
def top1_correct(logits: Tensor, target: Tensor) -> Tensor:
    return logits.argmax(-1) == target.to(logits.device)


def subset_correct(indices: Iterable[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """Top-1 with only ``indices`` competing (the others are masked to -inf before the argmax)."""
    idx = torch.tensor(sorted(indices), dtype=torch.long)
    keep = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    keep[idx] = True

    def correct(logits: Tensor, target: Tensor) -> Tensor:
        masked = logits.masked_fill(~keep.to(logits.device), float("-inf"))
        return masked.argmax(-1) == target.to(logits.device)

    return correct


def real_correct(logits: Tensor, target: Tensor) -> Tensor:
    """``target`` multi-hot bool [B,1000]; an all-False row (no ReaL label) is never correct."""
    pred = logits.argmax(-1, keepdim=True)
    return target.to(logits.device).bool().gather(-1, pred).squeeze(-1)


def real_valid(target: Tensor) -> Tensor:
    return target.bool().any(-1)


def coarse16_probs(logits: Tensor) -> Tensor:
    """[B,1000] logits -> [B,16] mean softmax probability per category (sorted category order)."""
    probs = logits.float().softmax(-1)
    cols = [probs[:, list(ix)].mean(-1) for ix in conflict_categories().values()]
    return torch.stack(cols, dim=-1)


def conflict_correct(logits: Tensor, target: Tensor) -> Tensor:
    return coarse16_probs(logits).argmax(-1) == target.to(logits.device)


# ------------------------------------------------------------------------------------------ folder scans
def _images_under(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # deterministic order across filesystems
        out.extend(Path(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return out


def _scan(folder: Path, label_of: Callable[[str], Any | None]) -> tuple[list[tuple[Path, Any]], list[str]]:
    """``(path, label_of(class folder name))`` for every image; also the class folders that got no label."""
    samples, unknown = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = label_of(sub.name)
        if label is None:
            unknown.append(sub.name)
            continue
        samples.extend((p, label) for p in _images_under(sub))
    return samples, unknown


def _find(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _looked_for(root: Path, names: Sequence[str]) -> str:
    return " or ".join(str(root / n) for n in names)


def _wnid_label(name: str) -> int | None:
    return wnid_to_index().get(name)


def _int_label(name: str) -> int | None:
    return int(name) if name.isdigit() and int(name) < NUM_CLASSES else None


# ------------------------------------------------------------------------------------------------- build
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


def group_mean(results: dict[str, float], sets: Sequence[EvalSet]) -> dict[str, float]:
    """Average results per ``EvalSet.group`` (all IN-C subsets -> one "imagenet_c"); others pass through.

    The IN-C mean is the unweighted mean over the subsets present, as IN-C is usually reported.
    Names not among ``sets`` are kept under their own name.
    """
    group_of = {s.name: s.group for s in sets}
    grouped: dict[str, list[float]] = {}
    for name, acc in results.items():
        grouped.setdefault(group_of.get(name, name), []).append(acc)
    return {g: sum(v) / len(v) for g, v in grouped.items()}

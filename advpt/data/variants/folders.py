"""Where each evaluation set lies under a root (its published folder name, then aliases) and the folder scans.

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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from advpt.data.corruptions import CORRUPTIONS
from advpt.data.variants.labels import NUM_CLASSES, wnid_to_index

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

"""The label spaces of the evaluation sets and the files they come from.

ImageNet-1k indices are the order of ``timm``'s ``imagenet_synsets.txt`` (i.e. sorted wnids); IN-A and IN-R
keep 200 of them (timm's ``imagenet_{a,r}_indices.txt``); the cue-conflict stimuli use Geirhos et al.'s 16
coarse categories. That mapping, ``advpt/data/_info/conflict_stimuli_16class.json``, is the
``<category>_indices`` lists of ``HumanCategories`` in ``modelvshuman/helper/human_categories.py``
(bethgelab/model-vs-human), identical to ``code/helper/human_categories.py`` in rgeirhos/texture-vs-shape.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

NUM_CLASSES = 1000

# The package's data files: advpt/data/_info (this file is advpt/data/variants/labels.py).
_INFO = Path(__file__).parent.parent / "_info"


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

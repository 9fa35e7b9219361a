"""Which images a model got right: ``outcomes.npz``, written by ``advpt evaluate`` beside ``results.json``.

One boolean array per scored set, corruption subset and robust radius (True: that image was classified
correctly), keyed as ``results.json`` names the set (``builtin``, ``corruptions/fog/3``, ``imagenet_val``,
``imagenet_c/fog/5``) or ``robust/<norm>/<radius as written>``. Beside each array, the indices of its
images in their split (the images ``max_images`` drew with the evaluation's seed, in order), and the
split itself (suite, data, seed). Two evaluations are compared image by image only where the split and
the indices agree; so the mean of each array is exactly the accuracy ``results.json`` states.

The file is data: read with ``allow_pickle=False`` (``advpt.trust``). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advpt.files import atomic_path

FILE = "outcomes.npz"
FORMAT = 1
# what np.load raises on a file that is absent, truncated, not a zip of arrays, or of another layout
UNREADABLE = (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Outcomes:
    """Per image of one set (or one attack): whether it was classified correctly, and its index in the split."""

    correct: np.ndarray  # bool [n]
    ids: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        if self.correct.ndim != 1 or self.correct.shape != self.ids.shape:
            raise ValueError(f"outcomes of {self.correct.shape} images with ids of {self.ids.shape}")


@dataclass(frozen=True)
class OutcomeFile:
    """A read ``outcomes.npz``: the split its images come from and each key's outcomes."""

    split: str
    outcomes: dict[str, Outcomes]

    def same_images(self, other: OutcomeFile, key: str) -> bool:
        """Whether ``key`` holds the same images, in the same order, in both files."""
        a, b = self.outcomes.get(key), other.outcomes.get(key)
        return (
            a is not None
            and b is not None
            and self.split == other.split
            and a.ids.shape == b.ids.shape
            and bool(np.array_equal(a.ids, b.ids))
        )


def write_outcomes(path: Path | str, outcomes: Mapping[str, Outcomes], split: str) -> Path:
    """Write ``outcomes`` (key -> per-image outcomes) and ``split`` to ``path`` atomically; returns the path.

    Layout: each key's boolean array under the key itself; ``_keys`` (the keys), ``_ids_of`` (for each
    key, which ``_ids/<j>`` array holds its image indices: sets of one size share one) and ``_split``.
    """
    arrays: dict[str, np.ndarray] = {}
    ids_of: list[int] = []
    seen: dict[str, int] = {}
    for key, o in outcomes.items():
        ids = np.ascontiguousarray(o.ids, dtype=np.int64)
        digest = hashlib.sha1(ids.tobytes()).hexdigest()
        if digest not in seen:
            seen[digest] = len(seen)
            arrays[f"_ids/{seen[digest]}"] = ids
        ids_of.append(seen[digest])
        arrays[key] = np.asarray(o.correct, dtype=bool)
    arrays["_keys"] = np.array(list(outcomes), dtype=np.str_)
    arrays["_ids_of"] = np.array(ids_of, dtype=np.int64)
    arrays["_split"] = np.array(split, dtype=np.str_)
    arrays["_format"] = np.array(FORMAT, dtype=np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to a name
        np.savez_compressed(f, **arrays)
    return Path(path)


def read_outcomes(path: Path | str) -> OutcomeFile | None:
    """``path`` as an :class:`OutcomeFile`; ``None`` when it is absent, unreadable or not of this layout."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = [str(k) for k in z["_keys"]]
            ids_of = z["_ids_of"]
            split = str(z["_split"])
            ids = {j: z[f"_ids/{j}"] for j in sorted({int(i) for i in ids_of})}
            outcomes = {
                key: Outcomes(z[key].astype(bool, copy=False), ids[int(j)])
                for key, j in zip(keys, ids_of, strict=True)
            }
    except UNREADABLE:
        return None
    return OutcomeFile(split, outcomes)

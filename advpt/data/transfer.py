"""The transfer datasets of Table 1 beside CIFAR: SUN397, RESISC45 and DMLab, read from their published layouts.

None is downloaded (tens of GB, or a TFDS export): each is read under ``data.root`` as published, and
an absent one is one line naming the layout expected.

- ``sun397``: torchvision's ``SUN397`` reader (``ROOT/SUN397/ClassName.txt`` + ``ROOT/SUN397/<letter>/
  <class>/sun_*.jpg``). The official split is partition 1 of 10 (``Training_01.txt`` / ``Testing_01.txt``
  from ``Partitions.zip``, 50 + 50 images per class) when those lists are in ``ROOT/SUN397`` or
  ``ROOT/SUN397/Partitions``; without them, a seeded per-class 80/20 split of every image.
- ``resisc45``: ``ROOT/NWPU-RESISC45/<class>/<image>.jpg`` (the archive as published), split by
  ``ROOT/resisc45-{train,test}.txt`` when present (the 60/20/20 lists of Neumann et al. that torchgeo
  uses; the val list is left out), else a seeded per-class 80/20 split.
- ``dmlab``: TFDS's ``dmlab`` exported as image folders, ``ROOT/dmlab/{train,validation,test}/<label>/
  *.png``; train is ``train``, test is ``test`` (``validation`` is left out).

A seeded split orders the images by path before shuffling, so every file system gives the same split.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from advpt.errors import UserError

TRANSFER = ("sun397", "resisc45", "dmlab")
SPLIT_SEED = 0  # the seeded split is one fixed split: finetune and evaluate must agree on it
TEST_FRACTION = 0.2
SUN397_PARTITION = "01"


def expected_layout(name: str, root: Path) -> str:
    """The published layout of ``name`` under ``root``, in words (for the one-line error)."""
    return {
        "sun397": f"{root}/SUN397/ClassName.txt and {root}/SUN397/<letter>/<class>/sun_*.jpg, "
        "SUN397.tar.gz extracted as torchvision's SUN397 reads it",
        "resisc45": f"{root}/NWPU-RESISC45/<class>/<image>.jpg, optionally with "
        f"{root}/resisc45-{{train,val,test}}.txt as torchgeo publishes them",
        "dmlab": f"{root}/dmlab/{{train,validation,test}}/<label>/*.png, TFDS's dmlab exported as image folders",
    }[name]


def _absent(name: str, root: Path, why: str = "") -> UserError:
    detail = f" ({why})" if why else ""
    return UserError(
        f"{name} is not under data.root={root}{detail}: expected {expected_layout(name, root)} "
        "(it is never downloaded; pass data.root=PATH)"
    )


class Split(Dataset):
    """The images ``indices`` of ``base``, with all of ``base``'s classes (so labels keep their meaning)."""

    def __init__(
        self, base: Dataset, indices: Sequence[int], labels: Sequence[int], classes: list[str]
    ) -> None:
        self.base, self.indices, self.classes = base, list(indices), list(classes)
        self.targets = [int(labels[i]) for i in self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[self.indices[i]]


def seeded_split(
    labels: Sequence[int],
    keys: Sequence[str],
    train: bool,
    fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> list[int]:
    """Per class, a seeded shuffle of its images (ordered by ``keys`` first); ``fraction`` of them are test.

    A class of two or more images keeps at least one for test; train gets the rest.
    """
    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(labels)), key=keys.__getitem__):
        by_class.setdefault(int(labels[i]), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_test = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        chosen += [members[j] for j in (order[n_test:] if train else order[:n_test])]
    return sorted(chosen)


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# -- SUN397 ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _sun397(root: str) -> Any:
    """torchvision's reader, once per root (it walks all 108,754 images)."""
    from torchvision.datasets import SUN397

    try:
        return SUN397(root, download=False)
    except (RuntimeError, OSError, KeyError) as e:  # absent, unreadable, or an image outside ClassName.txt
        raise _absent(
            "sun397", Path(root), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _sun397_partition(folder: Path) -> tuple[Path, Path] | None:
    for where in (folder, folder / "Partitions"):
        train, test = where / f"Training_{SUN397_PARTITION}.txt", where / f"Testing_{SUN397_PARTITION}.txt"
        if train.is_file() and test.is_file():
            return train, test
    return None


def sun397(root: Path, train: bool) -> Split:
    """SUN397's train or test split: official partition 1 when its lists are present, else seeded 80/20."""
    dataset = _sun397(str(root))
    folder = root / "SUN397"
    # torchvision keeps the files and labels it found in these two attributes.
    files, labels = dataset._image_files, dataset._labels
    keys = ["/" + Path(f).relative_to(folder).as_posix() for f in files]
    partition = _sun397_partition(folder)
    if partition is None:
        return Split(dataset, seeded_split(labels, keys, train), labels, dataset.classes)
    listed = _read_list(partition[0] if train else partition[1])
    index = {k: i for i, k in enumerate(keys)}
    missing = [k for k in listed if k not in index]
    if missing:
        raise UserError(
            f"sun397: {len(missing)} images listed in {partition[0 if train else 1]} are not under {folder} "
            f"(e.g. {missing[0]})"
        )
    return Split(dataset, [index[k] for k in listed], labels, dataset.classes)


# -- RESISC45 -------------------------------------------------------------------------------------------
class Folder(Dataset):
    """``folder/<class>/<image>`` as torchvision's ImageFolder reads it, with ``classes`` fixed if given
    (a class absent here keeps its label) and only the file names in ``keep`` if given.

    A module-level class rather than an ImageFolder subclass made on the fly, so loader workers can pickle it.
    """

    def __init__(self, folder: Path, classes: list[str] | None = None, keep: set[str] | None = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        if classes is None:
            classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.classes = list(classes)

        def valid(path: str) -> bool:
            p = Path(path)
            return p.suffix.lower() in IMG_EXTENSIONS and (keep is None or p.name in keep)

        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_dataset(str(folder), index, is_valid_file=valid, allow_empty=True)
        self.targets = [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return default_loader(path), label


def resisc45(root: Path, train: bool) -> Dataset:
    """RESISC45's train or test split: the published lists when present, else seeded 80/20."""
    folder = root / "NWPU-RESISC45"
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise _absent("resisc45", root)
    lists = {split: root / f"resisc45-{split}.txt" for split in ("train", "test")}
    if all(p.is_file() for p in lists.values()):
        split_file = lists["train" if train else "test"]
        names = set(_read_list(split_file))
        dataset = Folder(folder, keep=names)
        if len(dataset) != len(names):
            raise UserError(
                f"resisc45: {split_file} lists {len(names)} images, {len(dataset)} of them are under {folder}"
            )
        return dataset
    dataset = Folder(folder)
    keys = [Path(p).relative_to(folder).as_posix() for p, _ in dataset.samples]
    return Split(dataset, seeded_split(dataset.targets, keys, train), dataset.targets, dataset.classes)


# -- DMLab ----------------------------------------------------------------------------------------------
def _label_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)  # folder "3" is label 3, "10" comes after "9"


def dmlab(root: Path, train: bool) -> Dataset | None:
    """DMLab's ``train`` or ``test`` folder (``None`` without a test folder), labels as the train folder names them."""
    folder = root / "dmlab"
    if not (folder / "train").is_dir() or not any(p.is_dir() for p in (folder / "train").iterdir()):
        raise _absent("dmlab", root)
    classes = sorted((p.name for p in (folder / "train").iterdir() if p.is_dir()), key=_label_order)
    split = folder / ("train" if train else "test")
    if not split.is_dir():
        return None
    return Folder(split, classes=classes)


# -- dispatch ---------------------------------------------------------------------------------------------
def build_transfer(name: str, root: Path, train: bool) -> Dataset | None:
    """The ``train`` or test split of transfer dataset ``name`` under ``root``; one line if it is absent."""
    if name == "sun397":
        if not (root / "SUN397").is_dir():
            raise _absent("sun397", root)
        return sun397(root, train)
    if name == "resisc45":
        return resisc45(root, train)
    return dmlab(root, train)


def check_transfer(name: str, root: Path) -> None:
    """Fail early on an absent dataset: the cheap part of the layout, without reading every image."""
    if name == "sun397":
        if not (root / "SUN397" / "ClassName.txt").is_file():
            raise _absent("sun397", root)
    elif name == "resisc45":
        folder = root / "NWPU-RESISC45"
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise _absent("resisc45", root)
    elif not (root / "dmlab" / "train").is_dir():
        raise _absent("dmlab", root)

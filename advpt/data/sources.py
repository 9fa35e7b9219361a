"""Image sources: the built-in digits, CIFAR-10/100 in torchvision's layout, any ImageFolder tree,
and the transfer datasets of Table 1 (SUN397, RESISC45, DMLab: ``advpt.data.transfer``).

Every source yields ``(image, label)`` with ``image`` a PIL image or a uint8 tensor [3, H, W];
transforms turn it into float pixels in [0, 1].
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from advpt.data.transfer import TRANSFER, build_transfer, check_transfer
from advpt.errors import UserError

SOURCES = ("builtin", "cifar10", "cifar100", "imagefolder", "shards", *TRANSFER)


class Digits(Dataset):
    """scikit-learn's 1,797 handwritten digits (ships inside the package, no network), as 32x32 RGB.

    Every fifth image is held out as the test split, so both splits cover all ten classes.
    """

    num_classes = 10
    classes = [str(i) for i in range(10)]

    def __init__(self, train: bool = True, size: int = 32) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # 8x8 in [0, 1]
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        keep = (torch.arange(len(images)) % 5 != 0) if train else (torch.arange(len(images)) % 5 == 0)
        self.images = (
            (images[keep].clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        )
        self.targets = torch.from_numpy(digits.target)[keep].tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


def _cifar(name: str, root: Path, train: bool, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    existed = root.exists()
    try:
        return cls(str(root), train=train, download=download)
    except (RuntimeError, OSError) as e:  # absent and (offline or download disabled)
        if not existed:  # leave nothing behind: torchvision made the folder before failing
            shutil.rmtree(root, ignore_errors=True)
        folder = cls.base_folder
        raise UserError(
            f"{name} is not under data.root={root} (expected {root / folder}) and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no network'}); "
            f"put torchvision's {folder} there or run where the network allows"
        ) from None


def _imagefolder_root(root: Path, train: bool) -> Path | None:
    """``root/train`` + ``root/val`` (or ``test``) when split, else ``root`` itself for training."""
    if (root / "train").is_dir():
        if train:
            return root / "train"
        return next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    return root if train else None


def _classes(folder: Path) -> list[str]:
    """ImageFolder's classes: the sub-folders, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


class TrainNumbered(ImageFolder):
    """An evaluation split whose class numbers are the training split's, matched by folder name.

    torchvision numbers each folder's classes on its own: ``train/{a,b}`` and ``val/{a,z}`` would score
    ``z`` as ``b``. A class the training split lacks is refused; one it has that is absent here is fine.
    """

    def __init__(self, folder: Path, classes: list[str], **kwargs: Any) -> None:
        unknown = sorted(set(_classes(folder)) - set(classes))
        if unknown:
            raise UserError(
                f"{folder} has classes the training split lacks: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''} (its class folders must be among train/'s, "
                "matched by name)"
            )
        self.given = list(classes)
        super().__init__(str(folder), **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.given, {c: i for i, c in enumerate(self.given)}


def build_source(data: Mapping[str, Any], train: bool = True, image_size: int = 32) -> Dataset | None:
    """The dataset named by ``data.name`` (``None`` when it has no such split)."""
    name = data["name"]
    if name == "builtin":
        return Digits(train=train, size=image_size)
    if name == "shards":  # webdataset shards: streamed for training, indexed for evaluation
        from advpt.data.shards import build_source as build_shards

        return build_shards(data, train, image_size)
    root = Path(str(data.get("root") or "data")).expanduser()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, bool(data.get("download", True)))
    if name == "imagefolder":
        folder = _imagefolder_root(root, train)
        if folder is None:
            return None
        try:
            from advpt.data.skipping import open_rgb

            if not train:  # numbered by the training split's classes, by name
                return TrainNumbered(folder, _classes(root / "train"), loader=open_rgb, allow_empty=True)
            # an unreadable file comes back as None: skipped and counted, never fatal
            return ImageFolder(str(folder), loader=open_rgb)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"data.root={root}: {e}") from None
    if name in TRANSFER:
        return build_transfer(name, root, train)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")


def check_source(data: Mapping[str, Any]) -> None:
    """Fail early, before anything is written, on a missing data path."""
    name = data["name"]
    if name == "imagefolder":
        root = data.get("root")
        if not root:
            raise UserError(
                "data=imagefolder needs data.root=PATH (a folder of class sub-folders, or train/ + val/)"
            )
        root = Path(str(root)).expanduser()
        if not root.is_dir():
            raise UserError(f"data.root={root} does not exist or is not a folder")
        folder = _imagefolder_root(root, True)
        if folder is None or not any(p.is_dir() for p in folder.iterdir()):
            raise UserError(
                f"data.root={root} holds no class sub-folders (ImageFolder layout: ROOT/<class>/<image>)"
            )
        held_out = _imagefolder_root(root, False)
        if held_out is not None:  # before anything is written: a class train/ lacks would be mislabelled
            unknown = sorted(set(_classes(held_out)) - set(_classes(folder)))
            if unknown:
                raise UserError(
                    f"data.root={root}: {held_out.name}/ has classes train/ lacks: {', '.join(unknown[:5])}"
                    f"{' ...' if len(unknown) > 5 else ''} (its class folders must be among train/'s, "
                    "matched by name)"
                )
    elif name in ("cifar10", "cifar100"):
        root = Path(str(data.get("root") or "data")).expanduser()
        if not root.exists() and not data.get("download", True):
            raise UserError(f"data.root={root} does not exist (and data.download=false)")
        build_source(data, train=True)  # downloads if allowed, else one clear line
    elif name == "shards":
        from advpt.data.shards import check_source as check_shards

        check_shards(data)
    elif name in TRANSFER:
        check_transfer(name, Path(str(data.get("root") or "data")).expanduser())
        build_source(data, train=True)  # never downloaded: present as published, else one clear line


def num_classes(dataset: Dataset) -> int:
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else 0

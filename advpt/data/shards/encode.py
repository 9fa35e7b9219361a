"""What the writer puts into a shard: a source split's items as (extension, bytes, label), image files
copied as they are and decoded images encoded (PNG, or JPEG when ``max_side``/``quality`` ask)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def _encode(item: Any, max_side: int | None, quality: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of one decoded image: PNG, or JPEG when ``quality`` is given."""
    import numpy as np
    from PIL import Image

    if isinstance(item, torch.Tensor):
        array = item.permute(1, 2, 0).numpy() if item.ndim == 3 else item.numpy()
        image = Image.fromarray(np.ascontiguousarray(array).squeeze())
    else:
        image = item
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    if quality:
        image.save(out, "JPEG", quality=int(quality))
        return "jpg", out.getvalue()
    image.save(out, "PNG")
    return "png", out.getvalue()


def _file_sample(path: str, max_side: int | None, quality: int | None) -> tuple[str, bytes] | None:
    """A source image file's (extension, bytes): as it is, or re-encoded when asked; ``None`` if unreadable."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # reads the header: a file that is no image is left out
            kind = (image.format or "").lower()
            if quality or (max_side and max(image.size) > max_side):  # re-encoded only when asked
                return _encode(image, max_side, quality or (90 if kind == "jpeg" else None))
    except Exception:  # unreadable file: left out and listed in info.json
        return None
    ext = {
        "jpeg": "jpg",
        "png": "png",
        "webp": "webp",
        "gif": "gif",
        "bmp": "bmp",
        "tiff": "tif",
        "ppm": "ppm",
    }
    return ext.get(kind, "jpg" if data[:3] == b"\xff\xd8\xff" else "png"), data


def _files_of(dataset: Any) -> list[tuple[str, int]] | None:
    """``(path, label)`` of every item when the dataset reads image files (ImageFolder's ``samples``,
    also through a subset's ``indices``), so they can be copied as they are; ``None`` otherwise."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and all(
        isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) for s in samples[:1]
    ):
        return [(str(path), int(label)) for path, label in samples]
    indices = getattr(dataset, "indices", None)
    inner = getattr(dataset, "base", None)
    inner = getattr(dataset, "dataset", None) if inner is None else inner
    if indices is not None and inner is not None and (files := _files_of(inner)) is not None:
        return [files[int(i)] for i in indices]
    return None


class SplitReader:
    """One split of a source as (extension, bytes, label) per index; files are copied, not decoded."""

    def __init__(self, dataset: Dataset, max_side: int | None, quality: int | None) -> None:
        self.dataset, self.max_side, self.quality = dataset, max_side, quality
        self.files = _files_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def name(self, i: int) -> str:
        return self.files[i][0] if self.files is not None else str(i)

    def __call__(self, i: int) -> tuple[str, bytes, int] | None:
        if self.files is not None:
            path, label = self.files[i]
            found = _file_sample(path, self.max_side, self.quality)
            return None if found is None else (*found, int(label))
        image, label = self.dataset[i]
        if image is None:
            return None
        return (*_encode(image, self.max_side, self.quality), int(label))

"""The on-disk format of a shard folder: its file names, split names and the members of a sample."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INFO = "info.json"
FORMAT = "advpt-shards/1"
SPLITS = ("train", "val")
PLAN = ".plan.json"  # the settings of a write in progress (compared on a rerun)
PARTIAL = ".partial"  # a shard being written; renamed to its name once complete
DEFAULT_SHARD_SIZE = 1000
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
WRITE_SEED = 0  # the training split's order in the shards


def shard_pattern(split: str) -> str:
    """The names of a split's shards, numbered from 0: ``train-%06d.tar``."""
    return f"{split}-%06d.tar"


def shard_name(split: str, k: int) -> str:
    """The name of a split's ``k``-th shard: ``train-000000.tar``."""
    return shard_pattern(split) % k


def image_key(sample: Mapping[str, Any]) -> str | None:
    """The member of a sample that holds its image (``None`` when it has none)."""
    return next((k for k in IMAGE_EXTS if k in sample), None)

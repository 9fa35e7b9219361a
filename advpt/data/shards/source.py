"""The reader behind ``data=shards`` (what ``advpt.data.sources`` dispatches to): the training split to
stream (:class:`ShardSource`), the evaluation split to index, and the early check of both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from advpt.data.shards.index import ShardSplit
from advpt.data.shards.locate import Located, check_shards
from advpt.errors import UserError


class ShardSource:
    """The training split of a shard set: what :class:`ShardStream` reads (not indexable: it streams)."""

    def __init__(self, data: Mapping[str, Any], image_size: int = 32) -> None:
        located = Located(data)
        self.urls, self.classes = located.train, located.classes
        self.num_classes = len(self.classes)
        self.size = int(data.get("epoch_samples") or located.count("train") or 0)
        if self.size < 1:
            raise UserError(f"{located.info_url} records no training samples; set data.epoch_samples=N")
        self.buffer = int(data.get("shuffle_buffer") or 1000)
        # JPEGs decode at reduced scale while their short side stays >= this (0: always full size)
        side = data.get("decode_min_side")
        self.min_side = int(image_size if side is None else side)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Any:
        raise TypeError("shards are streamed, not indexed: read them through ShardStream")


def build_source(
    data: Mapping[str, Any], train: bool = True, image_size: int = 32
) -> ShardSource | ShardSplit | None:
    """The training split (streamed) or the evaluation split (indexed; ``None`` when there is none)."""
    if train:
        return ShardSource(data, image_size)
    located = Located(data)
    if not located.val:
        return None
    return ShardSplit(located.val, located.classes, data.get("cache"))


def check_source(data: Mapping[str, Any]) -> None:
    """Fail early, before anything is written, on a missing root, info.json or unreadable shard."""
    located = Located(data)
    check_shards(located.train, "training")
    if located.val:
        check_shards(located.val, "evaluation")

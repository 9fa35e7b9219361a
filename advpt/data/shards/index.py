"""The evaluation reader: a split's tar members indexed once and read by offset (:class:`ShardSplit`)."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext

from advpt.data.shards.decode import decode_image
from advpt.data.shards.layout import PARTIAL, image_key
from advpt.data.shards.locate import is_remote
from advpt.errors import UserError


class ShardSplit(Dataset):
    """An evaluation split of a shard set, indexed by sample: ``(uint8 image [3,H,W] or None, label)``.

    The tar members are listed once (their headers only) and read by offset, so every sample is read
    exactly once and in order. Samples missing their image or label are left out and counted
    (``incomplete``); an image that does not decode comes back as ``None`` (skipped by the loader).
    Remote shards are copied into ``cache`` first.
    """

    def __init__(self, urls: Sequence[str], classes: Sequence[str], cache: str | None = None) -> None:
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.paths = [_local_copy(u, cache) for u in urls]
        self.items: list[tuple[int, int, int]] = []  # (shard, offset, size) of each image
        self.targets: list[int] = []
        self.incomplete = 0
        for shard, path in enumerate(self.paths):
            self._index(shard, path)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def _index(self, shard: int, path: str) -> None:
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = base_plus_ext(member.name)  # webdataset's own grouping of files
                    if key is None:
                        continue
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext.lower()] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as e:  # a truncated shard: what came before the damage is kept
            if not samples:
                raise UserError(f"evaluation shard {path} is not a readable tar file ({e})") from None
        with open(path, "rb") as f:
            for key in order:
                members = samples[key]
                image = image_key(members)
                label = _read_label(f, members.get("cls"))
                if image is None or label is None:
                    self.incomplete += 1
                    continue
                self.items.append((shard, *members[image]))
                self.targets.append(label)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        shard, offset, size = self.items[i]
        if self._pid != os.getpid():  # a forked loader process must not share its parent's file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:  # one open file per shard and process
            f = self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115
        f.seek(offset)
        data = f.read(size)
        try:
            return decode_image(data), self.targets[i]
        except Exception:  # undecodable: skipped by the loader
            return None, self.targets[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # loader processes open their own
        return state


def _read_label(f: Any, where: tuple[int, int] | None) -> int | None:
    if where is None:
        return None
    f.seek(where[0])
    try:
        return int(f.read(where[1]).decode().strip())
    except ValueError:
        return None


def _local_copy(url: str, cache: str | None) -> str:
    """A local path of ``url``: itself, or a copy in ``cache`` (kept for the next run)."""
    import hashlib
    import shutil

    import webdataset as wds

    if not is_remote(url):
        return url
    folder = Path(cache or Path.home() / ".cache" / "advpt" / "shards").expanduser()
    target = folder / (hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1])
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + PARTIAL)
        try:
            with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"evaluation shard {url} cannot be read ({type(e).__name__}: {e})") from None
        os.replace(tmp, target)
    return str(target)

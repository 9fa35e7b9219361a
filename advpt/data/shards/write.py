"""The writer behind ``advpt shards``: a source's splits as shards plus info.json, resumable
(:func:`write_shards`), and the check that ``out`` may receive them."""

from __future__ import annotations

import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from advpt.data.shards.encode import SplitReader
from advpt.data.shards.layout import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    INFO,
    PARTIAL,
    PLAN,
    SPLITS,
    WRITE_SEED,
    shard_name,
    shard_pattern,
)
from advpt.errors import UserError
from advpt.files import write_json


def _plan(
    data: Mapping[str, Any], sizes: Mapping[str, int], shard_size: int, max_side: Any, quality: Any
) -> dict:
    source = {k: data.get(k) for k in ("name", "root") if data.get(k) is not None}
    if "root" in source:
        source["root"] = str(Path(str(source["root"])).expanduser().resolve())
    return {
        "format": FORMAT,
        "source": source,
        "source_samples": dict(sizes),
        "shard_size": shard_size,
        "max_side": max_side,
        "quality": quality,
        "seed": WRITE_SEED,
    }


def check_out(out: Path, data: Mapping[str, Any]) -> None:
    """``out`` is new, empty, or a (finished or interrupted) write of the same source."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file():
        raise UserError(
            f"out={out} is not empty and holds no `advpt shards` output: give a new or empty folder"
        )


def write_shards(
    data: Mapping[str, Any],
    out: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int | None = None,
    quality: int | None = None,
    image_size: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``data``'s splits as shards into ``out`` (resuming an interrupted write); return info.json."""
    import webdataset as wds

    from advpt.data.sources import build_source as source_of
    from advpt.data.sources import num_classes

    check_out(out, data)
    readers: dict[str, SplitReader] = {}
    classes: list[str] = []
    for split in SPLITS:
        dataset = source_of(data, train=split == "train", image_size=image_size)
        if dataset is None:
            continue
        readers[split] = SplitReader(dataset, max_side, quality)
        if not classes:
            classes = [str(c) for c in getattr(dataset, "classes", None) or range(num_classes(dataset))]
    plan = _plan(data, {s: len(r) for s, r in readers.items()}, shard_size, max_side, quality)
    out.mkdir(parents=True, exist_ok=True)
    if (out / PLAN).is_file():
        before = json.loads((out / PLAN).read_text())
        if before != plan:
            changed = ", ".join(k for k in plan if before.get(k) != plan[k])
            raise UserError(
                f"out={out} holds shards written with other settings ({changed} differ): "
                "give a new out= or remove that folder"
            )
    else:
        write_json(out / PLAN, plan)

    splits: dict[str, Any] = {}
    for split, reader in readers.items():
        n = len(reader)
        order = list(range(n))
        if split == "train":  # shards of mixed classes: a shuffle buffer then mixes well
            random.Random(WRITE_SEED).shuffle(order)
        count = max(1, math.ceil(n / shard_size))
        names = [shard_name(split, k) for k in range(count)]
        missing = [k for k in range(count) if not (out / names[k]).is_file()]
        if missing:
            log(f"advpt shards: writing {len(missing)} of {count} {split} shards into {out}")
        for run in _runs(missing):
            with wds.ShardWriter(
                str(out / shard_pattern(split)),
                maxcount=shard_size,
                maxsize=float("inf"),
                start_shard=run[0],
                opener=lambda name: name + PARTIAL,  # TarWriter writes (and closes) this path
                post=lambda name: os.replace(name + PARTIAL, name),  # a finished shard, atomically
                verbose=0,
                encoder=False,
                mtime=0,  # an int: a float mtime makes tarfile add a PAX header to every member
            ) as writer:
                for j, k in enumerate(run):
                    if j:
                        writer.next_stream()
                    for i in order[k * shard_size : (k + 1) * shard_size]:
                        sample = reader(i)
                        if sample is None:
                            log(f"advpt shards: skipped unreadable {reader.name(i)}")
                            continue
                        ext, payload, label = sample
                        writer.write({"__key__": f"{i:09d}", ext: payload, "cls": str(label).encode()})
        shards, skipped = [], []
        for k, name in enumerate(names):
            keys = _keys(out / name)
            shards.append({"name": name, "samples": len(keys)})
            expected = {f"{i:09d}" for i in order[k * shard_size : (k + 1) * shard_size]}
            skipped += sorted(reader.name(int(key)) for key in expected - keys)
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards, "skipped": skipped}
    info = {**plan, "classes": classes, "splits": splits}
    write_json(out / INFO, info)  # last: its presence means finished
    return info


def _runs(indices: Sequence[int]) -> list[list[int]]:
    """Consecutive runs: [0, 1, 4, 5, 6] -> [[0, 1], [4, 5, 6]]."""
    runs: list[list[int]] = []
    for k in indices:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _keys(path: Path) -> set[str]:
    with tarfile.open(path, "r:") as tar:
        return {base_plus_ext(m.name)[0] for m in tar if m.isfile()}

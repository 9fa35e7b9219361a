"""webdataset shards: the writer behind ``advpt shards`` and the reader behind ``data=shards``.

Layout of a folder written by :func:`write_shards`::

    DIR/train-000000.tar ...   the training split, in a fixed shuffled order (shards mix the classes)
    DIR/val-000000.tar ...     the evaluation split, in the source's order
    DIR/info.json              written last: classes, sample counts, shard names, skipped files

Each sample is ``<key>.<ext>`` (the image's bytes: the source file as it is, or PNG for decoded
sources such as the built-in digits and CIFAR, or a JPEG when ``max_side``/``quality`` ask for a
re-encoding) and ``<key>.cls`` (the label as decimal text). Keys are the sample's index in its split,
so a rerun of an interrupted write finishes it without duplicates: finished shards are renamed into
place atomically and kept, the others are written again.

Reading: training streams (:class:`ShardStream`): every rank and loader process resamples shards of
its own share with replacement through a shuffle buffer, and stops after a fixed number of batches,
the same on every rank. Evaluation indexes the tar members and reads them by offset
(:class:`ShardSplit`), so every sample is read once, in order, and any subset can be picked.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate
from webdataset.tariterators import base_plus_ext

from advpt.data.skipping import SkipCounter
from advpt.errors import UserError
from advpt.files import write_json
from advpt.trust import runs_program

INFO = "info.json"
FORMAT = "advpt-shards/1"
SPLITS = ("train", "val")
PLAN = ".plan.json"  # the settings of a write in progress (compared on a rerun)
PARTIAL = ".partial"  # a shard being written; renamed to its name once complete
DEFAULT_SHARD_SIZE = 1000
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
WRITE_SEED = 0  # the training split's order in the shards
DRAFT_MIN_FACTOR = 4  # reduced-size JPEG decoding from 1/4 scale on (benchmarks/loader.py)


# -------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """Image bytes as a uint8 tensor ``[3, H, W]``.

    JPEG: ``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a tensor), or Pillow with
    ``draft()``, which decodes at 1/4 or 1/8 scale in the DCT domain, when the reduced image keeps its
    short side ``>= min_side`` (at 1/2 scale Pillow is no faster than decode_jpeg at full size: the
    entropy decoding, which scaling does not shorten, dominates). PNG and WebP:
    ``torchvision.io.decode_image``; anything else Pillow can read, via Pillow.
    """
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io import decode_image as tv_decode

    head = data[:3]
    if head == b"\xff\xd8\xff":
        if min_side:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            factor = 8
            while factor >= DRAFT_MIN_FACTOR and min(width, height) // factor < min_side:
                factor //= 2
            if factor >= DRAFT_MIN_FACTOR:
                image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
                return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # a JPEG libjpeg-turbo refuses in this mode: Pillow decides
            pass
    elif head in (b"\x89PN", b"RIF"):
        try:
            return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _image_key(sample: Mapping[str, Any]) -> str | None:
    return next((k for k in IMAGE_EXTS if k in sample), None)


# -------------------------------------------------------------------------------------- locating
def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _expand(value: Any) -> list[str]:
    """A brace pattern, a ``::``-joined list, or a list of them, as a list of shard URLs."""
    from webdataset.shardlists import expand_urls

    items = [value] if isinstance(value, str) else [str(v) for v in value]
    urls: list[str] = []
    for item in items:
        urls += [str(Path(u).expanduser()) if not _is_remote(u) else u for u in expand_urls(item)]
    return urls


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _read_json(url: str) -> dict[str, Any] | None:
    """A JSON file, local or remote; ``None`` when it cannot be read."""
    import webdataset as wds

    try:
        if _is_remote(url):
            with wds.gopen(url, "rb") as f:
                return json.loads(f.read())
        return json.loads(Path(url).read_text())
    except Exception:  # absent, unreachable, not JSON: the caller says what is missing
        return None


class Located:
    """Where a ``data=shards`` config's shards and info.json are, resolved once (one line if they are not)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        root = data.get("root")
        items = [] if root is None else [root] if isinstance(root, str) else [str(r) for r in root]
        if not any(str(i).strip() for i in items):
            raise UserError(
                "data=shards needs data.root=DIR (a folder written by `advpt shards`) "
                "or a list / brace pattern of shard URLs"
            )
        single = items[0] if len(items) == 1 else None
        folder = Path(single).expanduser() if single and not _is_remote(single) else None
        info_url = data.get("info")
        if folder is not None and folder.is_dir():
            self.root = str(folder)
            info_url = str(info_url or folder / INFO)
            info = _read_json(info_url)
            if info is None:
                raise UserError(
                    f"data.root={root} holds no readable {INFO}: not a finished `advpt shards` output "
                    f"(rerun `advpt shards ... out={root}`: it finishes an interrupted write)"
                )
            self.train = [str(folder / n) for n in _names(info, "train")]
        else:
            if folder is not None and not any(c in single for c in "{}:") and not folder.exists():
                raise UserError(f"data.root={root} does not exist")
            self.root = ",".join(items)
            self.train = _expand(items)
            info_url = str(info_url or _parent(self.train[0]) + "/" + INFO)
            info = _read_json(info_url)
            if info is None:
                raise UserError(
                    f"cannot read {info_url} (the classes and counts `advpt shards` writes beside the "
                    "shards); pass data.info=PATH_OR_URL"
                )
        if info.get("format") != FORMAT:
            raise UserError(f"{info_url} is not an `advpt shards` info file (format {info.get('format')!r})")
        if not self.train:
            raise UserError(f"data.root={root} names no training shard")
        self.info, self.info_url = info, info_url
        val = data.get("val")
        if val:
            self.val: list[str] | None = _expand(val)
        else:
            names = _names(info, "val")
            self.val = [_parent(self.info_url) + "/" + n for n in names] if names else None
        self.classes: list[str] = [str(c) for c in info.get("classes", [])]

    def count(self, split: str) -> int:
        return int(((self.info.get("splits") or {}).get(split) or {}).get("samples", 0))


def _names(info: Mapping[str, Any], split: str) -> list[str]:
    """The shard file names info.json lists for ``split``: plain names of files beside it, nothing else
    (a path or URL there would be read, or run, from a file: ``advpt.trust``)."""
    entry = (info.get("splits") or {}).get(split)
    names = [str(s["name"]) for s in entry["shards"]] if entry else []
    for name in names:
        if name != Path(name).name or name in (".", "..") or runs_program(name):
            raise UserError(f"{INFO} lists shard {name!r}, which is not a file name beside it")
    return names


def check_shards(urls: Sequence[str], what: str) -> None:
    """Every local shard exists and is a tar file; the first remote one can be opened. One line if not."""
    import webdataset as wds

    for url in urls:
        if _is_remote(url):
            continue
        path = Path(url)
        if not path.is_file():
            raise UserError(f"{what} shard {url} does not exist")
        try:
            with tarfile.open(path, "r:"):
                pass
        except (OSError, tarfile.TarError) as e:
            raise UserError(
                f"{what} shard {url} is not a readable tar file ({type(e).__name__}: {e})"
            ) from None
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        try:
            with wds.gopen(remote[0], "rb") as f:
                f.read(512)
        except Exception as e:
            raise UserError(f"{what} shard {remote[0]} cannot be read ({type(e).__name__}: {e})") from None


def check_source(data: Mapping[str, Any]) -> None:
    """Fail early, before anything is written, on a missing root, info.json or unreadable shard."""
    located = Located(data)
    check_shards(located.train, "training")
    if located.val:
        check_shards(located.val, "evaluation")


# ---------------------------------------------------------------------------------------- sources
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
                image = _image_key(members)
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

    if not _is_remote(url):
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


# ------------------------------------------------------------------------------- training stream
def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (the same on every machine and Python)."""
    import hashlib

    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _same(_: Any = None) -> int:
    return 0


def shard_share(
    urls: Sequence[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int
) -> list[str]:
    """The shards one loader process of one rank resamples from in an epoch.

    Shards are dealt (in an order fixed by seed and epoch) to the ``world * workers`` loader
    processes of all ranks, so their draws do not overlap; with fewer shards than processes, to the
    ranks; with fewer shards than ranks, every process draws from all of them.
    """
    order = list(urls)
    random.Random(_mix(seed, epoch)).shuffle(order)
    slots = world * workers
    if len(order) >= slots:
        return order[rank * workers + worker :: slots]
    if len(order) >= world:
        return order[rank::world]
    return order


class ShardStream(IterableDataset):
    """One rank's training batches of an epoch, streamed from webdataset shards.

    Each loader process resamples shards of its share (:func:`shard_share`) with replacement
    (``webdataset.ResampledShards``), mixes their samples in a shuffle buffer, decodes and augments
    them, and yields full batches; ``with_epoch`` ends it after its part of ``batches`` batches, so
    every rank takes the same number of steps whatever its shards hold. The draws are a function of
    (seed, epoch, rank, loader process, batches skipped): a resumed epoch continues with a fresh draw
    of the batches it still owes (``skip``), it does not replay the stopped run's batches.
    Undecodable or incomplete samples are skipped (the batch is filled from the stream) and counted.
    """

    def __init__(
        self,
        source: ShardSource,
        transform: Callable[[Any], Any],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.urls, self.transform, self.batch_size = list(source.urls), transform, batch_size
        self.buffer, self.min_side = source.buffer, source.min_side
        self.seed, self.rank, self.world = seed, rank, world
        self.batches = max(1, source.size // world // batch_size)
        self.epoch, self.skip = 0, 0  # skip: samples of this epoch already trained on (a resume)
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip_batches = self.skip // self.batch_size
        owed = max(0, self.batches - skip_batches)
        mine = owed // workers + int(worker < owed % workers)
        seed = _mix(self.seed, self.epoch, skip_batches, self.rank, worker)
        urls = shard_share(self.urls, self.seed, self.epoch, self.rank, self.world, worker, workers)
        failures = [0]

        def shard_failed(exn: Exception) -> bool:
            self.skipped.add()
            failures[0] += 1
            if failures[0] > 10 * len(urls) + 10:
                raise RuntimeError(f"no readable sample in {failures[0]} reads of {urls[:3]}...: {exn}")
            return True

        counter = iter(range(2**62))

        def decode(sample: Mapping[str, Any]) -> Any:
            key = _image_key(sample)
            try:
                label = int(bytes(sample["cls"]).decode().strip())
                image = decode_image(sample[key], self.min_side)  # type: ignore[index]
            except Exception:  # no image, no label, undecodable: skipped, the stream goes on
                self.skipped.add()
                return None
            failures[0] = 0
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_mix(seed, next(counter)))  # CPU only: cheap
                return self.transform(image), label

        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, worker_seed=_same, deterministic=True),
            wds.tarfile_to_samples(handler=shard_failed),
            wds.shuffle(self.buffer, initial=min(self.buffer, max(self.batch_size, 100)), seed=seed),
            wds.map(decode),
            wds.batched(self.batch_size, collation_fn=default_collate, partial=False),
        ).with_epoch(mine)
        return iter(pipeline) if mine > 0 else iter(())  # with_epoch(0) would mean no limit


class StreamLoader(DataLoader):
    """The loader of a :class:`ShardStream` (batches come made): tells it the epoch before each pass.

    Loader processes are started for each pass (not kept), so they see the epoch and resume position
    the main process set.
    """

    def __init__(self, dataset: ShardStream, epoch_of: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self._epoch_of = epoch_of

    @property
    def position(self) -> ShardStream:
        """What keeps the epoch and the resume position (an ``EpochSampler`` for indexed data)."""
        return self.dataset  # type: ignore[return-value]

    def __iter__(self) -> Any:
        stream = self.position
        stream.set_epoch(self._epoch_of())
        iterator = super().__iter__()  # loader processes (or the in-process fetcher) read the state now
        stream.skip = 0  # only the first pass after a resume is shortened
        return iterator


def stream_loader(
    source: ShardSource,
    transform: Callable[[Any], Any],
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    epoch_of: Callable[[], int] | None = None,
) -> StreamLoader:
    stream = ShardStream(source, transform, batch_size, seed, rank=rank, world=world)
    return StreamLoader(
        stream,
        epoch_of=epoch_of or (lambda: stream.epoch),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------- writing
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


class _SplitReader:
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
    readers: dict[str, _SplitReader] = {}
    classes: list[str] = []
    for split in SPLITS:
        dataset = source_of(data, train=split == "train", image_size=image_size)
        if dataset is None:
            continue
        readers[split] = _SplitReader(dataset, max_side, quality)
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
        names = [f"{split}-{k:06d}.tar" for k in range(count)]
        missing = [k for k in range(count) if not (out / names[k]).is_file()]
        if missing:
            log(f"advpt shards: writing {len(missing)} of {count} {split} shards into {out}")
        for run in _runs(missing):
            with wds.ShardWriter(
                str(out / f"{split}-%06d.tar"),
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

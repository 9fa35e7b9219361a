"""The training reader: one rank's batches of an epoch streamed from shards (:class:`ShardStream`), the
shards each loader process draws from (:func:`shard_share`) and the loader that runs it."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from advpt.data.shards.decode import decode_image
from advpt.data.shards.layout import image_key
from advpt.data.shards.source import ShardSource
from advpt.data.skipping import SkipCounter


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
            key = image_key(sample)
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

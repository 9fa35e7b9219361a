"""kNN evaluation of an encoder's features: DINO's weighted kNN, clean and under feature-space PGD.

The classifier is DINO's ``eval_knn`` (solo-learn's ``WeightedKNNClassifier``): cosine similarity, the
``k`` nearest bank items, each voting exp(similarity / T). The bank is a training split without
augmentation, the queries an evaluation split; the robust score classifies each query perturbed by PGD
away from its own clean feature (cosine distance). :class:`KnnProbe` measures both; pre-training's
monitor (:mod:`advpt.training.monitor`) runs it every few epochs, ``advpt evaluate`` once on any encoder.

Each process may encode a share; the features are gathered so that any number of processes gives the
numbers one process gives (``data=shards``: each process draws its part of the bank from its own
shards). Nothing the caller holds is changed: eval mode without gradients, the random generators
restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from advpt.attacks import Attack, frozen, pgd
from advpt.evaluate.suites import capped
from advpt.models import Encoder

Gather = Callable[[Tensor], Tensor]
"""``all_gather`` of one tensor of the same shape on every process: [world, *shape]."""


# -- the classifier ---------------------------------------------------------------------------------
def knn_votes(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Each query's vote per class [Q, C]: the sum of exp(cos / T) over its ``k`` most similar bank items."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    votes = []
    for part in queries.split(chunk):
        similarity, nearest = (part @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        zeros = torch.zeros(len(part), num_classes, device=part.device)
        votes.append(zeros.scatter_add_(1, bank_labels[nearest], weights))
    return torch.cat(votes) if votes else torch.zeros(0, num_classes, device=queries.device)


def knn_top1(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """The fraction of queries whose highest vote (:func:`knn_votes`) is their label."""
    classes = int(max(bank_labels.max(), labels.max())) + 1
    votes = knn_votes(bank, bank_labels, queries, classes, k, temperature)
    return float((votes.argmax(dim=1) == labels).float().mean())


# -- each process's share, and the whole ----------------------------------------------------------
class Indexed(Dataset):
    """``(image, label) -> (image, label, index)``: the index orders the gathered features."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int, int] | None:
        item = self.base[i]
        return None if item is None else (item[0], item[1], i)


def share(size: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's batches: runs of ``batch_size`` consecutive indices, dealt to the processes in turn.

    The batches are those one process would make, so every image is encoded (and attacked, from the
    same random start) in the same company whatever the number of processes.
    """
    starts = range(rank * batch_size, size, world * batch_size)
    return [list(range(s, min(s + batch_size, size))) for s in starts]


def share_loader(dataset: Dataset, batch_size: int, rank: int, world: int, workers: int) -> DataLoader:
    from advpt.data.skipping import EvalLoader, drop_unreadable

    batches = share(len(dataset), batch_size, rank, world)  # type: ignore[arg-type]
    return EvalLoader(
        Indexed(dataset), batch_sampler=batches, collate_fn=drop_unreadable, num_workers=workers
    )


def numbered(stream: Iterable[Any], rank: int, world: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """A streamed split's batches, each image numbered ``rank + world * position`` (an order to gather in)."""
    seen = 0
    for images, labels in stream:
        yield images, labels, rank + world * torch.arange(seen, seen + len(labels))
        seen += len(labels)


def gathered(parts: list[Tensor], index: Tensor, rows: int, gather: Gather | None) -> list[Tensor]:
    """Every process's ``parts`` (row-aligned with ``index``), in index order.

    Each process pads its rows to ``rows`` (the most any process holds), marked by index -1, so that
    every process sends the same shape; the padding is dropped after the gather.
    """
    if gather is None:
        order = index.argsort()
        return [p[order] for p in parts]
    pad = rows - len(index)
    index = F.pad(index, (0, pad), value=-1)
    everything = [gather(F.pad(p, (0, 0) * (p.dim() - 1) + (0, pad))).flatten(0, 1) for p in parts]
    index = gather(index).flatten()
    keep = index >= 0
    order = index[keep].argsort()
    return [p[keep][order] for p in everything]


def _cat(parts: list[Tensor], empty: Tensor) -> Tensor:
    """``parts`` end to end (``empty`` when a process had no batch)."""
    return torch.cat(parts) if parts else empty


# -- the bank and the queries ---------------------------------------------------------------------
def bank_and_queries(
    train: Dataset,
    evaluation: Dataset,
    size: int,
    bank_size: int | None,
    query_size: int | None,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[Dataset, Dataset]:
    """The bank (at most ``bank_size`` training images) and the queries (at most ``query_size``
    evaluation images), both without augmentation; each a random subset fixed by ``seed``."""
    from advpt.data.module import Transformed
    from advpt.data.shards import ShardSource, ShardStream
    from advpt.data.transforms import eval_transform

    transform = eval_transform(size)
    queries = capped(Transformed(evaluation, transform), query_size, seed + 1)
    if isinstance(train, ShardSource):  # streamed: the first bank_size images of a fixed draw
        bank = ShardStream(train, transform, batch_size, seed, rank, world)
        wanted = int(bank_size or train.size)
        bank.batches = max(1, -(-wanted // (world * batch_size)))
        return bank, queries
    return capped(Transformed(train, transform), bank_size, seed), queries


class Autocast:
    """The two hooks of a Lightning precision plugin that :meth:`KnnProbe.encode` uses, for autocast."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype)

    def convert_input(self, x: Tensor) -> Tensor:
        return x


# -- the measurement -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnnScores:
    """kNN top-1 (fractions) of the clean queries and of the attacked ones, and how many of each."""

    top1: float
    robust_top1: float | None
    bank: int
    queries: int


class KnnProbe:
    """The clean and robust weighted-kNN top-1 of an encoder's pooled features on a bank and queries."""

    def __init__(
        self,
        bank: Dataset | None,
        queries: Dataset | None,
        attack: Attack,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        self.bank, self.queries, self.attack = bank, queries, attack
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def encode(
        self,
        encoder: Encoder,
        dataset: Dataset,
        rank: int = 0,
        world: int = 1,
        gather: Gather | None = None,
        robust: bool = False,
        epoch: int = 0,
        precision: Any = None,
    ) -> list[Tensor]:
        """Pooled features of ``dataset`` [N, D] and its labels [N] (and, ``robust``, the features of
        the PGD-perturbed images), every process's share gathered, in the dataset's order."""
        from advpt.data.shards import ShardStream

        device = next(encoder.parameters()).device
        if isinstance(dataset, ShardStream):  # data=shards' training split: each process its own draw
            loader, at_most = numbered(dataset, rank, world), dataset.batches * dataset.batch_size
        else:
            loader = share_loader(dataset, self.batch_size, rank, world, self.num_workers)
            at_most = len(share(len(dataset), self.batch_size, 0, world)) * self.batch_size  # type: ignore[arg-type]
        context = precision.forward_context if precision is not None else nullcontext
        features, labels, index, attacked = [], [], [], []
        for images, y, i in loader:
            x = images.to(device)
            if precision is not None:
                x = precision.convert_input(x)
            with context():
                features.append(encoder.features(x).float())
                if robust:
                    attacked.append(self.attacked(encoder, x, features[-1], int(i[0]), epoch))
            labels.append(y.to(device))
            index.append(i.to(device))
        vectors, numbers = (
            torch.zeros(0, encoder.dim, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
        parts = [_cat(features, vectors), _cat(labels, numbers)] + (
            [_cat(attacked, vectors)] if robust else []
        )
        return gathered(parts, _cat(index, numbers), at_most, gather)

    def attacked(self, encoder: Encoder, x: Tensor, clean: Tensor, first: int, epoch: int) -> Tensor:
        """Features of ``x`` perturbed by PGD to maximise the cosine distance from ``clean``.

        The random start is drawn from (seed, epoch, the batch's first index): the same for a batch
        however many processes share the work.
        """

        def distance(x_adv: Tensor) -> Tensor:
            return 1 - F.cosine_similarity(encoder.features(x_adv).float(), clean, dim=-1)

        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + first)
        delta = pgd(distance, x, self.attack, model=encoder)
        with torch.no_grad():
            return encoder.features(x + delta).float()

    def scores(
        self,
        encoder: Encoder,
        rank: int = 0,
        world: int = 1,
        gather: Gather | None = None,
        epoch: int = 0,
        precision: Any = None,
        robust: bool = True,
    ) -> KnnScores:
        """The clean and robust (``None`` unless ``robust``) kNN top-1 of ``encoder``; its modes, flags
        and the random generators untouched."""
        assert self.bank is not None and self.queries is not None
        device = next(encoder.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), frozen(encoder), torch.no_grad():
            bank, bank_labels = self.encode(encoder, self.bank, rank, world, gather, precision=precision)
            clean, labels, *attacked = self.encode(
                encoder, self.queries, rank, world, gather, robust=robust, epoch=epoch, precision=precision
            )
        top1 = knn_top1(bank, bank_labels, clean, labels, self.k, self.temperature)
        robust_top1 = (
            knn_top1(bank, bank_labels, attacked[0], labels, self.k, self.temperature) if robust else None
        )
        return KnnScores(top1, robust_top1, len(bank), len(clean))

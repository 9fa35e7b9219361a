"""The learning monitor of pre-training (``monitor=knn``): a weighted kNN top-1 of the encoder's pooled
features, clean and under PGD, every few epochs and at the end of training.

The features are those fine-tuning starts from: the exported encoder's (a method's weight average where
it keeps one), pooled as its head pools. The bank is the training split without augmentation (at most
``bank_size`` images), the queries the evaluation split (at most ``eval_size``); the classifier is
DINO's ``eval_knn`` (solo-learn's ``WeightedKNNClassifier``): cosine similarity, the ``k`` nearest, each
voting exp(similarity / T). The robust score classifies the queries perturbed by PGD away from their
clean feature (cosine distance). Each process encodes its share; the features are gathered so that any
number of processes gives the numbers one process gives (``data=shards``: each process draws its part
of the bank from its own shards). Nothing the training reads is changed: eval mode without gradients,
the random generators restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
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


# -- the monitor ----------------------------------------------------------------------------------
class KnnMonitor(Callback):
    """Logs ``monitor/knn_top1`` and ``monitor/knn_robust_top1`` (and ``monitor/seconds``, its cost)
    at the end of every ``every_n_epochs``-th epoch and of the last one."""

    def __init__(
        self,
        bank: Dataset | None,
        queries: Dataset | None,
        attack: Attack,
        every_n_epochs: int = 5,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        self.bank, self.queries, self.attack = bank, queries, attack
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
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

    def measure(
        self,
        encoder: Encoder,
        rank: int = 0,
        world: int = 1,
        gather: Gather | None = None,
        epoch: int = 0,
        precision: Any = None,
    ) -> dict[str, float]:
        """The clean and robust kNN top-1 of ``encoder``; training state and random generators untouched."""
        assert self.bank is not None and self.queries is not None
        device = next(encoder.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), frozen(encoder), torch.no_grad():
            bank, bank_labels = self.encode(encoder, self.bank, rank, world, gather, precision=precision)
            clean, labels, attacked = self.encode(
                encoder, self.queries, rank, world, gather, robust=True, epoch=epoch, precision=precision
            )
        return {
            "monitor/knn_top1": knn_top1(bank, bank_labels, clean, labels, self.k, self.temperature),
            "monitor/knn_robust_top1": knn_top1(
                bank, bank_labels, attacked, labels, self.k, self.temperature
            ),
        }

    def due(self, trainer: L.Trainer) -> bool:
        """At the end of every ``every_n_epochs``-th epoch, and of the last (by epochs, steps or a stop)."""
        epoch = trainer.current_epoch + 1
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (
            epoch % self.every_n_epochs == 0
            or trainer.should_stop
            or (max_steps is not None and 0 < max_steps <= trainer.global_step)
            or (max_epochs is not None and 0 < max_epochs <= epoch)
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bank is None or self.queries is None or not self.due(trainer):
            return
        start = time.perf_counter()
        gather = trainer.strategy.all_gather if trainer.world_size > 1 else None
        scores = self.measure(
            pl_module.exported_encoder(),  # type: ignore[operator]
            trainer.global_rank,
            trainer.world_size,
            gather,
            trainer.current_epoch,
            trainer.precision_plugin,
        )
        scores["monitor/seconds"] = time.perf_counter() - start
        # Every process holds the same numbers; sync_dist keeps Lightning's distributed logging rule.
        pl_module.log_dict(
            scores, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1, batch_size=1
        )


def _cat(parts: list[Tensor], empty: Tensor) -> Tensor:
    """``parts`` end to end (``empty`` when a process had no batch)."""
    return torch.cat(parts) if parts else empty


# -- from the config ------------------------------------------------------------------------------
class ConfiguredMonitor(KnnMonitor):
    """The monitor of a pretrain config; its images are read when the run starts (``setup``)."""

    def __init__(self, cfg: DictConfig) -> None:
        from advpt.config import attack_kwargs, parse_number

        monitor = cfg.monitor
        run_attack = attack_kwargs(cfg)  # the run's norm and radius; monitor.attack's for a nominal run
        norm = run_attack["norm"] if run_attack else str(monitor.attack.name)
        eps = run_attack["eps"] if run_attack else parse_number(monitor.attack.eps, "monitor.attack.eps")
        super().__init__(
            None,
            None,
            Attack(norm=norm, eps=eps, steps=int(monitor.attack.steps)),
            every_n_epochs=int(monitor.every_n_epochs),
            k=int(monitor.k),
            temperature=float(monitor.temperature),
            batch_size=int(monitor.batch_size),
            num_workers=int(cfg.data.get("num_workers", 0)),
            seed=int(cfg.seed),
        )
        self.cfg = cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from advpt.data.module import Transformed
        from advpt.data.shards import ShardSource, ShardStream
        from advpt.data.sources import build_source
        from advpt.data.transforms import eval_transform

        if self.bank is not None:
            return
        data, size, monitor = self.cfg.data, int(self.cfg.model.img_size), self.cfg.monitor
        train = getattr(trainer.datamodule, "source", None) or build_source(data, train=True, image_size=size)
        evaluation = build_source(data, train=False, image_size=size)
        # Sharded weights are gathered in every forward pass, which the ranks' uneven shares would not match.
        sharded = getattr(trainer.strategy, "strategy_name", "") == "fsdp"
        if evaluation is None or sharded:
            why = (
                "with trainer.strategy=fsdp (not yet)"
                if sharded
                else f"(data={data.name} has no evaluation split)"
            )
            if trainer.is_global_zero:
                print(f"advpt pretrain: monitor=knn is off {why}", flush=True)
            return
        transform = eval_transform(size)
        self.queries = capped(Transformed(evaluation, transform), monitor.eval_size, self.seed + 1)
        if isinstance(train, ShardSource):  # streamed: the first bank_size images of a fixed draw
            rank, world = trainer.global_rank, trainer.world_size
            self.bank = ShardStream(train, transform, self.batch_size, self.seed, rank, world)
            wanted = int(monitor.bank_size or train.size)
            self.bank.batches = max(1, -(-wanted // (world * self.batch_size)))
        else:
            self.bank = capped(Transformed(train, transform), monitor.bank_size, self.seed)


def monitor_callbacks(cfg: DictConfig) -> list[Callback]:
    """The monitor a config asks for: ``monitor=knn`` in pretrain; none for ``monitor=none`` or a command
    without a ``monitor`` (fine-tuning)."""
    monitor = cfg.get("monitor")
    if monitor is None or monitor.get("name") == "none":
        return []
    return [ConfiguredMonitor(cfg)]

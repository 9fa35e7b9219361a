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

The measurement is :class:`advpt.evaluate.knn.KnnProbe`, which ``advpt evaluate`` runs on any encoder;
this module schedules it during training and logs what it finds.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import Dataset

from advpt.attacks import Attack
from advpt.evaluate.knn import Gather, KnnProbe, bank_and_queries, gathered, knn_top1, knn_votes, share
from advpt.evaluate.suites import capped
from advpt.models import Encoder

# Re-exported: the monitor's tests and the DDP probe import these kNN primitives from here.
__all__ = [
    "ConfiguredMonitor",
    "KnnMonitor",
    "capped",
    "gathered",
    "knn_top1",
    "knn_votes",
    "monitor_callbacks",
    "share",
]


# -- the monitor ----------------------------------------------------------------------------------
class KnnMonitor(KnnProbe, Callback):
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
        super().__init__(bank, queries, attack, k, temperature, batch_size, num_workers, seed)
        self.every_n_epochs = every_n_epochs

    def measure(
        self,
        encoder: Encoder,
        rank: int = 0,
        world: int = 1,
        gather: Gather | None = None,
        epoch: int = 0,
        precision: Any = None,
    ) -> dict[str, float | None]:
        """The clean and robust kNN top-1 of ``encoder``; training state and random generators untouched."""
        scores = self.scores(encoder, rank, world, gather, epoch, precision)
        return {"monitor/knn_top1": scores.top1, "monitor/knn_robust_top1": scores.robust_top1}

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
            num_workers=0,  # data.num_workers, sized to the machine in setup when null
            seed=int(cfg.seed),
        )
        self.cfg = cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from advpt.config.machine import loader_workers
        from advpt.data.sources import build_source

        if self.bank is not None:
            return
        data, size, monitor = self.cfg.data, int(self.cfg.model.img_size), self.cfg.monitor
        self.num_workers = loader_workers(data.get("num_workers"), trainer.num_devices)
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
        rank, world = trainer.global_rank, trainer.world_size
        self.bank, self.queries = bank_and_queries(
            train,
            evaluation,
            size,
            monitor.bank_size,
            monitor.eval_size,
            self.seed,
            self.batch_size,
            rank,
            world,
        )


def monitor_callbacks(cfg: DictConfig) -> list[Callback]:
    """The monitor a config asks for: ``monitor=knn`` in pretrain; none for ``monitor=none`` or a command
    without a ``monitor`` (fine-tuning)."""
    monitor = cfg.get("monitor")
    if monitor is None or monitor.get("name") == "none":
        return []
    return [ConfiguredMonitor(cfg)]

"""``data/skipped``: how many unreadable or incomplete samples a training run has skipped so far."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from advpt.data.skipping import unreadable


def skipped_total(trainer: L.Trainer) -> int:
    """Items this process's training and validation loaders have skipped so far."""
    loaders: list[Any] = [trainer.train_dataloader]
    val = trainer.val_dataloaders
    loaders += list(val) if isinstance(val, list | tuple) else [val]
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:  # the module keeps the loader it built; Lightning may wrap it
        loaders.append(getattr(datamodule, "_train", None))
    seen: set[int] = set()
    total = 0
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and id(dataset) not in seen:
            seen.add(id(dataset))
            total += unreadable(dataset)
    return total


class SkippedSamples(Callback):
    """Logs ``data/skipped`` (all processes together) and ends the run with one line when it is not 0."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.log(
            "data/skipped",
            float(skipped_total(trainer)),
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            sync_dist=trainer.world_size > 1,
            batch_size=1,
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end, not on_train_end: the progress bar has closed its line by then
        total = torch.tensor(float(skipped_total(trainer)), device=pl_module.device)
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        if trainer.is_global_zero and int(total):
            print(
                f"advpt: skipped {int(total)} unreadable or incomplete sample{'s' if int(total) != 1 else ''} "
                "(data/skipped in metrics.csv)",
                flush=True,
            )

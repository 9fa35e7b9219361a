"""The callbacks every training run uses: ``last.ckpt`` kept current and atomic, throughput, the
final step's metrics, and example images for the loggers that draw them."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from advpt.files import disk_fault, disk_full


class ImagesPerSecond(Callback):
    """Logs training throughput as ``train/images_per_s``: the images trained per second of wall clock
    since the previous logged step (loading included; validation and the epoch-end monitor left out).

    An image counts once however many views of it the method trains on: BYOL's two augmented views of
    one image are one image, as MAE's single view is (:func:`images_in`). The count is this process's
    batch; a run of N processes trains N times as many. On a GPU the clock is read after
    ``torch.cuda.synchronize()``, and only where the number is logged (the host queues work ahead of
    the device, so an unsynchronised clock times the queueing, not the work).
    """

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start: float | None = None
        self._images = 0

    def _now(self, pl_module: L.LightningModule) -> float:
        import torch

        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return self._clock()

    def _restart(self, *args: Any) -> None:
        self._start, self._images = None, 0

    # A window starts at an epoch's first batch and after validation, so neither the pause between
    # epochs (the monitor) nor validation is timed.
    on_train_epoch_start = _restart
    on_validation_end = _restart

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._start = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        self._images += images_in(batch)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (
            0 < (trainer.max_steps or -1) <= trainer.global_step
        )
        if not (trainer._logger_connector.should_update_logs or last):  # what Lightning logs, and the end
            return
        now = self._now(pl_module)
        pl_module.log(
            "train/images_per_s", self._images / max(now - self._start, 1e-9), batch_size=self._images
        )
        self._start, self._images = now, 0


def images_in(batch: Any) -> int:
    """The images in a training batch ``([view, ...], labels)``: one per example, whatever its views."""
    views = batch[0]
    first = views[0] if isinstance(views, list | tuple) else views
    return int(first.shape[0])


class LastCheckpoint(Callback):
    """Keep ``checkpoints/last.ckpt`` current: every ``every_n_steps`` optimiser steps, at each epoch
    end, and when the run is told to stop (SIGTERM, or SIGUSR1 which the launch turns into SIGTERM).

    Written to a temporary file and renamed, so a run killed mid-write never leaves a broken
    checkpoint (Lightning's ModelCheckpoint writes in place, and cannot combine step and epoch triggers).
    """

    def __init__(self, directory: Path, every_n_steps: int) -> None:
        self.path = Path(directory) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_at = -1
        self._epochs_done = 0
        self._told = False

    def save(self, trainer: L.Trainer, epochs_done: int) -> None:
        if trainer.global_step == self._saved_at or trainer.sanity_checking:
            return
        self._epochs_done = epochs_done
        # Not advpt.files.atomic_path: saving is a collective (every rank calls it, with one name).
        tmp = self.path.with_name(".last.ckpt.tmp")
        try:
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                os.replace(tmp, self.path)
        except BaseException as e:
            if trainer.is_global_zero:  # the writer: the previous last.ckpt stays, its replacement goes
                fault = disk_fault(e, tmp)
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a run that never saved one keeps no checkpoints/
                    self.path.parent.rmdir()
                if fault is not None:
                    raise disk_full(self.path, fault) from e
            raise
        trainer.strategy.barrier()
        self._saved_at = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        # Read back by `resume=auto` to tell a finished run from one to continue.
        return {"epochs_done": self._epochs_done}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.received_sigterm and trainer.world_size == 1:
            # One process stops before the next batch, the last one logged (Lightning itself would
            # wait for the epoch's end); several stop together there too, after rank 0 has told
            # the others (Lightning's broadcast), and on_exception saves.
            raise SIGTERMException()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, trainer.current_epoch + int(last))
        # Several processes stop together, after the step in which any of them was told to stop.
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self._told, all=False):
            raise SIGTERMException()

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        """With several processes, SIGTERM (SIGUSR1 too, see advpt.launch) is noted here instead of by
        Lightning, which stops each process on its own signal, wherever it reaches it: the signal
        reaches the processes at different moments, possibly a step apart, and saving is a collective
        (under FSDP it gathers from all of them), so a lone stop would leave the others waiting."""
        if trainer.world_size == 1:
            return
        import signal

        def told(signum: int, frame: Any) -> None:
            self._told = True
            launcher = trainer.strategy.launcher
            if trainer.is_global_zero and hasattr(launcher, "kill"):  # pass it on to this node's workers
                launcher.kill(signum)

        self._told = False
        signal.signal(signal.SIGTERM, told)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, trainer.current_epoch + 1)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer, trainer.current_epoch)


VIEW_HEIGHT = 224
"""Panels are logged at least this many pixels high: a 32-px (or 16-px) panel is a speck in wandb's and
TensorBoard's image views."""


def viewable(images: Any, height: int = VIEW_HEIGHT) -> Any:
    """``images`` (N, C, H, W) enlarged by the smallest whole factor that makes them ``height`` pixels high
    or more, each pixel repeated (nearest): the pixels an attack changed stay sharp, not smoothed."""
    factor = -(-height // int(images.shape[-2]))
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


class ExampleImages(Callback):
    """At each epoch end (and at the end of training), sends the method's figures (adversarial
    examples, MAE reconstructions) to the image-capable loggers (wandb, TensorBoard).

    Every process computes them and the first alone writes: under FSDP a forward pass (MAE's
    reconstructions) gathers each sharded group from every process, and one process alone would wait
    for the others forever."""

    def __init__(self) -> None:
        self._logged_at = -1

    def send(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | WandbLogger)]
        step = trainer.global_step
        if not loggers or step == self._logged_at:  # the same on every process: the same config
            return
        self._logged_at = step
        figures = pl_module.example_images() if hasattr(pl_module, "example_images") else {}
        if not trainer.is_global_zero:
            return
        for name, images in figures.items():
            images = viewable(images.detach().float().cpu())
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=list(images), step=step)
                else:
                    logger.experiment.add_images(f"images/{name}", images, step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.send(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.send(trainer, pl_module)


class FinalStepMetrics(Callback):
    """Writes the last optimiser step's training metrics when Lightning's logging interval skipped it,
    so that every run, also one of 1-3 steps or one short epoch, has them in metrics.csv."""

    def __init__(self) -> None:
        self._logged_at, self._epoch = -1, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._epoch = trainer.current_epoch
        if trainer._logger_connector.should_update_logs:  # what Lightning decides for this step
            self._logged_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == 0 or step == self._logged_at or not trainer.loggers:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if metrics:
            metrics["epoch"] = self._epoch
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)  # Lightning's rows count steps from 0


class StopOnNonFinite(Callback):
    """A non-finite loss (or gradient) stops the run before the optimiser applies it.

    The check runs after the backward pass and before the step: the step is made a no-op (every
    gradient dropped, so AdamW moves nothing, momentum and weight decay included), training stops, and
    ``last.ckpt`` is saved from the last finite weights; the command then refuses to export them. Processes
    agree with one reduction, as they do on SIGTERM. Under a GradScaler (16-mixed on a GPU) an overflowing
    gradient is the scaler's to skip: only the loss is checked there.
    """

    def __init__(self) -> None:
        self.found: str | None = None
        self.step: int | None = None

    @staticmethod
    def _not_finite(pl_module: L.LightningModule, optimizer: Any, scaled: bool) -> str | None:
        import torch

        loss = getattr(pl_module, "last_loss", None)
        if loss is not None and not bool(torch.isfinite(loss).all()):
            return f"train/loss is {float(loss)}"
        if scaled:
            return None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shard
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return "a gradient is not finite"
        return None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        found = self._not_finite(pl_module, optimizer, scaled)
        stop = found is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self.found = found or "another process met a non-finite loss or gradient"
        self.step = trainer.global_step + 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        trainer.should_stop = True

    def message(self, command: str) -> str:
        lr = "method.base_lr" if command == "pretrain" else "optim.lr"
        return (
            f"training stopped at optimiser step {self.step}: {self.found}; that step was not applied, "
            f"checkpoints/last.ckpt holds the last finite weights and nothing was exported (try a lower "
            f"{lr}, trainer.precision=32-true, or resume= from that last.ckpt with other settings)"
        )


def diverged(trainer: L.Trainer) -> StopOnNonFinite | None:
    """The run's :class:`StopOnNonFinite` if it stopped training, else ``None``."""
    found = next((c for c in trainer.callbacks if isinstance(c, StopOnNonFinite)), None)
    return found if found is not None and found.found is not None else None

"""The ``pretrain`` command: build data, method and Trainer from the config, fit, export the encoder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from advpt.config import attack_kwargs, check_pretrain
from advpt.data.module import PretrainData
from advpt.methods import METHODS, PretrainMethod


class ImagesPerSecond(Callback):
    """Logs training throughput (images/s, wall clock per optimiser step) as ``train/images_per_s``."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = self._clock()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        images = batch[0][0].shape[0]
        pl_module.log(
            "train/images_per_s", images / max(self._clock() - self._start, 1e-9), batch_size=images
        )


class LastCheckpoint(Callback):
    """Keep ``checkpoints/last.ckpt`` current: every ``every_n_steps`` optimiser steps and at each epoch end.

    Written to a temporary file and renamed, so a run killed mid-write never leaves a broken
    checkpoint (Lightning's ModelCheckpoint writes in place, and cannot combine step and epoch triggers).
    """

    def __init__(self, directory: Path, every_n_steps: int) -> None:
        self.path = Path(directory) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_at = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_at or trainer.sanity_checking:
            return
        tmp = self.path.with_name(".last.ckpt.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


class ExampleImages(Callback):
    """At each epoch end (and at the end of training), sends the method's figures (adversarial
    examples, MAE reconstructions) to the image-capable loggers (wandb, TensorBoard)."""

    def __init__(self) -> None:
        self._logged_at = -1

    def send(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | WandbLogger)]
        step = trainer.global_step
        if not trainer.is_global_zero or not loggers or step == self._logged_at:
            return
        self._logged_at = step
        figures = pl_module.example_images() if hasattr(pl_module, "example_images") else {}
        for name, images in figures.items():
            images = images.detach().float().cpu()
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=list(images), step=step)
                else:
                    logger.experiment.add_images(f"images/{name}", images, step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.send(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.send(trainer, pl_module)


def wandb_id() -> str:
    """A fresh wandb run id (wandb's own generator is not public API)."""
    import secrets

    return secrets.token_hex(4)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    # metrics.csv sits beside the run's other outputs, so Lightning's "directory not empty" note is expected.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    name = cfg.logger.name
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    elif name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:  # offline unless credentials are configured
            offline = not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists())
        # The run id is kept in the run directory so a resumed job continues the same wandb run.
        # The run id is kept beside the run, and read back from the resumed run's directory, so a
        # resumed or requeued job continues the same wandb run instead of starting a new one.
        id_file = run_dir / "wandb_id.txt"
        previous = [id_file]
        if cfg.get("resume"):
            previous.append(Path(str(cfg.resume)).resolve().parent.parent / "wandb_id.txt")
        found = next((p for p in previous if p.is_file()), None)
        run_id = found.read_text().strip() if found else wandb_id()
        logger = WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            save_dir=str(run_dir),
            offline=bool(offline),
            id=run_id,
            resume="allow",
            tags=list(cfg.logger.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        id_file.write_text(run_id)
        loggers.append(logger)
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The Trainer of a run: ``cfg.trainer`` arguments, our loggers, ``last.ckpt`` and throughput callbacks."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # LastCheckpoint keeps checkpoints/last.ckpt; Lightning's default callback would write a second copy.
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        **kwargs,
        default_root_dir=str(run_dir),
        logger=build_loggers(cfg, run_dir),
        callbacks=[
            LastCheckpoint(run_dir / "checkpoints", int(cfg.checkpoint_every_n_steps)),
            ImagesPerSecond(),
            ExampleImages(),
        ],
    )


def build_module(cfg: DictConfig, num_classes: int) -> PretrainMethod:
    method = METHODS[cfg.method.name]
    return method(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        method=OmegaConf.to_container(cfg.method, resolve=True),
        attack=attack_kwargs(cfg),
        num_classes=num_classes,
        batch_size=int(cfg.data.batch_size),
        seed=int(cfg.seed),
    )


def fit(cfg: DictConfig, run_dir: Path) -> PretrainMethod:
    """Pre-train as configured, writing checkpoints, metrics, config and encoder into ``run_dir``."""
    cfg = check_pretrain(cfg, touch_data=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    data = PretrainData(
        cfg.data, views=cfg.method.views, image_size=int(cfg.model.img_size), seed=int(cfg.seed)
    )
    module = build_module(cfg, data.num_classes)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)
    if trainer.is_global_zero:
        module.export_encoder(run_dir)
    return module


check = check_pretrain


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    fit(cfg, Path(HydraConfig.get().runtime.output_dir))

"""The ``pretrain`` command: build data, method and Trainer from the config, fit, export the encoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from advpt.config import attack_kwargs, check_pretrain
from advpt.data.module import PretrainData
from advpt.data.skipped_metric import SkippedSamples
from advpt.launch import finished_message, processes, read_progress, resolve_resume
from advpt.methods import METHODS, PretrainMethod
from advpt.runs import number, read_record, shown, summary, write_record


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

    def save(self, trainer: L.Trainer, epochs_done: int) -> None:
        if trainer.global_step == self._saved_at or trainer.sanity_checking:
            return
        self._epochs_done = epochs_done
        tmp = self.path.with_name(".last.ckpt.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
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

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, trainer.current_epoch + 1)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer, trainer.current_epoch)


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


def wandb_id() -> str:
    """A fresh wandb run id (wandb's own generator is not public API)."""
    import secrets

    return secrets.token_hex(4)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    if rank_zero_only.rank == 0:
        _continue_metrics(csv_logger, run_dir, cfg.get("resume"))
    loggers: list[Any] = [csv_logger]
    name = cfg.logger.name
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    elif name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = cfg.logger.offline
        if offline is None:  # offline unless credentials are configured
            offline = not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists())
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
        if rank_zero_only.rank == 0:  # other processes log nothing to wandb
            id_file.write_text(run_id)
        loggers.append(logger)
    return loggers


def _continue_metrics(logger: Any, run_dir: Path, resume: Any) -> None:
    """A run continued in its own directory keeps the metrics.csv rows logged before the stop.

    (Lightning's CSV writer deletes an existing file; its rows are handed back to the new writer.)
    """
    import csv

    path = run_dir / "metrics.csv"
    if not resume or Path(str(resume)).resolve().parent.parent != run_dir.resolve() or not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = list(reader.fieldnames or []), list(reader)
    writer = logger.experiment  # creating the writer removes the old file
    writer.metrics_keys = keys
    writer.metrics = [{k: v for k, v in row.items() if v != ""} for row in rows]


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The Trainer of a run: ``cfg.trainer`` arguments, our loggers, ``last.ckpt`` and throughput callbacks."""
    from advpt.quiet import silence_noise

    silence_noise()  # also in the worker processes of a multi-process run, which build theirs here
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # LastCheckpoint keeps checkpoints/last.ckpt; Lightning's default callback would write a second copy.
    kwargs.setdefault("enable_checkpointing", False)
    # The training loader shards itself across processes (EpochSampler), resumably; Lightning's
    # distributed sampler would replace it.
    kwargs.setdefault("use_distributed_sampler", False)
    # A run shorter than the logging interval still writes its metrics.csv.
    if int(kwargs.get("max_steps") or -1) > 0:
        kwargs["log_every_n_steps"] = min(
            int(kwargs.get("log_every_n_steps") or 50), int(kwargs["max_steps"])
        )
    plugins = []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Pre-emption saves last.ckpt and exits; requeueing is the scheduler's (or submitit's) job.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        **kwargs,
        default_root_dir=str(run_dir),
        logger=build_loggers(cfg, run_dir),
        plugins=plugins or None,
        callbacks=[
            LastCheckpoint(run_dir / "checkpoints", int(cfg.checkpoint_every_n_steps)),
            ImagesPerSecond(),
            ExampleImages(),
            FinalStepMetrics(),
            SkippedSamples(),
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
        compile=bool(cfg.compile),
    )


def fit(cfg: DictConfig, run_dir: Path) -> PretrainMethod | None:
    """Pre-train as configured, writing checkpoints, metrics, config and encoder into ``run_dir``.

    Returns ``None`` when ``resume=auto`` finds the run already finished (nothing is written).
    """
    cfg = check_pretrain(cfg, touch_data=False)
    if not begin(cfg, run_dir, "pretrain"):
        return None
    data = PretrainData(
        cfg.data, views=cfg.method.views, image_size=int(cfg.model.img_size), seed=int(cfg.seed)
    )
    module = build_module(cfg, data.num_classes)
    trainer = build_trainer(cfg, run_dir)
    with processes(trainer, "pretrain", run_dir):
        # weights_only: a checkpoint is data (advpt.trust); ours hold tensors and plain values only.
        trainer.fit(module, datamodule=data, ckpt_path=cfg.resume, weights_only=True)
    if trainer.is_global_zero:
        module.export_encoder(run_dir)
        write_record(
            run_dir, "pretrain", trainer.global_step, loss=number(trainer.callback_metrics, "train/loss")
        )
    return module


def begin(cfg: DictConfig, run_dir: Path, command: str) -> bool:
    """Start (or continue) a training run in ``run_dir``: resolve ``resume=auto``, write the config.

    False when ``resume=auto`` finds the run already finished: it says so and writes nothing.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if str(cfg.resume) == "auto" and (message := finished_message(run_dir, cfg.trainer)):
        if rank_zero_only.rank == 0:
            print(f"advpt {command}: {message}")
        return False
    with open_dict(cfg):
        cfg.resume = resolve_resume(cfg.resume, run_dir)
    if cfg.resume is not None and rank_zero_only.rank == 0:
        step = read_progress(Path(cfg.resume))["global_step"]
        print(f"advpt {command}: resuming {shown(Path(cfg.resume))} from step {step}", flush=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # the workers of a multi-process run read it, never write it
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return True


check = check_pretrain


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if fit(cfg, run_dir) is not None and rank_zero_only.rank == 0:
        print(summarise(run_dir))


def summarise(run_dir: Path) -> str:
    """The lines a pre-training run ends with: steps and final loss, where it is, what to run next."""
    record = read_record(run_dir)
    loss = record.get("loss")
    steps = record.get("steps", 0)
    headline = f"{steps} step{'s' if steps != 1 else ''}, final train/loss " + (
        f"{loss:.4f}" if loss is not None else "not logged"
    )
    return summary("pretrain", run_dir, headline, f"advpt finetune pretrained={shown(run_dir)}")

"""What a training command (pretrain, finetune) is made of besides its module: starting or continuing
the run in its folder, the Trainer with its loggers and callbacks, and the fit itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from advpt.data.skipped_metric import SkippedSamples
from advpt.files import atomic_path, write_text
from advpt.resume import finished_message, read_progress, resolve_resume
from advpt.runs import shown
from advpt.training.callbacks import (
    ExampleImages,
    FinalStepMetrics,
    ImagesPerSecond,
    LastCheckpoint,
    StopOnNonFinite,
)
from advpt.training.monitor import monitor_callbacks


def begin(cfg: DictConfig, run_dir: Path, command: str) -> bool:
    """Start (or continue) a training run in ``run_dir``: resolve ``resume=auto``, write the config.

    False when ``resume=auto`` finds the run already finished: it says so and writes nothing.
    """
    if str(cfg.resume) == "auto" and (message := finished_message(run_dir, cfg.trainer)):
        if rank_zero_only.rank == 0:
            print(f"advpt {command}: {message}")
        return False
    with open_dict(cfg):
        cfg.resume = resolve_resume(cfg.resume, run_dir)
    if cfg.resume is not None and rank_zero_only.rank == 0:
        # Read as data, before Lightning opens it: one line if it is not a training checkpoint.
        step = read_progress(Path(cfg.resume))["global_step"]
        print(f"advpt {command}: resuming {shown(Path(cfg.resume))} from step {step}", flush=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # the workers of a multi-process run read it, never write it
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return True


def wandb_id() -> str:
    """A fresh wandb run id (wandb's own generator is not public API)."""
    import secrets

    return secrets.token_hex(4)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    csv_logger = AtomicCSVLogger(save_dir=str(run_dir), name="", version="")
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
            write_text(id_file, run_id)
        loggers.append(logger)
    return loggers


class _AtomicMetricsWriter(ExperimentWriter):
    """Lightning's writer of metrics.csv and hparams.yaml, each save written beside its file and renamed
    over it: a disk that fills up mid-save leaves the rows saved before it, never half a row."""

    def save(self) -> None:
        if not self.metrics:
            return
        target = self.metrics_file_path
        with atomic_path(target) as tmp:
            if os.path.isfile(target):
                shutil.copyfile(target, tmp)  # Lightning appends the new rows to it
            self.metrics_file_path = str(tmp)
            try:
                super().save()
            finally:
                self.metrics_file_path = target

    def log_hparams(self, params: dict[str, Any]) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        self.hparams.update(params)
        with atomic_path(Path(self.log_dir) / self.NAME_HPARAMS_FILE) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)


class AtomicCSVLogger(CSVLogger):
    """Lightning's CSV logger whose files are written atomically (:class:`_AtomicMetricsWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AtomicMetricsWriter(log_dir=self.log_dir)
        return self._experiment


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


class ParameterSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column, which is counted only for a module with an
    ``example_input_array`` (a forward on rank 0 alone, which a sharded module cannot take) and so read 0
    for every layer and in total."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.callbacks import model_summary
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        model_summary.log.info("\n" + "\n".join(lines))


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
    from advpt.training.sharding import strategy

    kwargs["strategy"] = strategy(kwargs.get("strategy", "auto"))  # fsdp: FSDP2
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
            *([ParameterSummary()] if kwargs.get("enable_model_summary", True) is not False else []),
            ImagesPerSecond(),
            ExampleImages(),
            FinalStepMetrics(),
            StopOnNonFinite(),
            SkippedSamples(),
            *monitor_callbacks(cfg),  # pretrain's kNN monitor (monitor=knn); fine-tuning has none
        ],
    )


def fit(trainer: L.Trainer, module: L.LightningModule, data: L.LightningDataModule, resume: Any) -> None:
    """``trainer.fit``, continuing from ``resume`` (a ``last.ckpt``) when given."""
    # weights_only: a checkpoint is data (advpt.trust); ours hold tensors and plain values only.
    failed = True
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        failed = False
    finally:
        finish_wandb(trainer, failed)


def finish_wandb(trainer: L.Trainer, failed: bool) -> None:
    """End the wandb run now, not at interpreter exit: wandb's closing lines (sync, run page) then come
    before the command's summary or error line, which stay the last thing a user reads."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)

"""The ``pretrain`` command: build data, method and Trainer from the config, fit, export the encoder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from advpt.config import attack_kwargs, check_pretrain
from advpt.data.module import PretrainData
from advpt.launch import processes
from advpt.methods import METHODS, PretrainMethod
from advpt.runs import number, read_record, shown, summary, write_record
from advpt.training.harness import begin, build_trainer
from advpt.training.harness import fit as fit_resumable


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
        fit_resumable(trainer, module, data, cfg.resume)
    if trainer.is_global_zero:
        module.export_encoder(run_dir)
        write_record(
            run_dir, "pretrain", trainer.global_step, loss=number(trainer.callback_metrics, "train/loss")
        )
    return module


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

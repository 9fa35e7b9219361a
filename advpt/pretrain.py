"""The ``pretrain`` command: build data, method and Trainer from the config, fit, export the encoder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from advpt.config import attack_kwargs, check_pretrain
from advpt.data.module import PretrainData
from advpt.errors import Diverged
from advpt.launch import processes
from advpt.methods import METHODS, PretrainMethod
from advpt.runs import number, read_record, shown, summary, write_record
from advpt.training.callbacks import diverged
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
        activation_checkpointing=bool(cfg.activation_checkpointing),
    )


def fit(cfg: DictConfig, run_dir: Path) -> PretrainMethod | None:
    """Pre-train as configured, writing checkpoints, metrics, config and encoder into ``run_dir``.

    Returns ``None`` when ``resume=auto`` finds the run already finished (nothing is written).
    """
    cfg = check(cfg, touch_data=False)
    if not begin(cfg, run_dir, "pretrain"):
        return None
    data = PretrainData(
        cfg.data, views=cfg.method.views, image_size=int(cfg.model.img_size), seed=int(cfg.seed)
    )
    module = build_module(cfg, data.num_classes)
    if cfg.init is not None and cfg.resume is None:  # a resumed run's weights are its checkpoint's
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        for line in load_init(module, str(cfg.init), OmegaConf.to_container(cfg.model, resolve=True)):
            if rank_zero_only.rank == 0:
                print(f"advpt pretrain: {line}", flush=True)
    trainer = build_trainer(cfg, run_dir)
    with processes(trainer, "pretrain", run_dir):
        fit_resumable(trainer, module, data, cfg.resume)
        state = module.encoder_state()  # every process, before they end: FSDP gathers the shards
    stopped = diverged(trainer)
    if stopped is not None:  # every process agrees; the first says so, nothing non-finite is exported
        if trainer.is_global_zero:
            raise Diverged(stopped.message("pretrain"))
        return None
    if trainer.is_global_zero:
        module.export_encoder(run_dir, state)
        metrics = trainer.callback_metrics
        write_record(
            run_dir,
            "pretrain",
            trainer.global_step,
            loss=number(metrics, "train/loss"),
            knn_top1=number(metrics, "monitor/knn_top1"),  # monitor=knn; None when off
            knn_robust_top1=number(metrics, "monitor/knn_robust_top1"),
            attack=str(cfg.attack.name),
            eps=float(cfg.eps),
            eps_224=float(cfg.eps_224),
            img_size=int(cfg.model.img_size),
        )
    return module


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """:func:`check_pretrain`, then ``init=``: the weights to start from exist and fit the model."""
    cfg = check_pretrain(cfg, touch_data)
    with open_dict(cfg):
        if str(cfg.get("init")).lower() in ("none", "null"):
            cfg.init = None
        if cfg.init is not None:
            cfg.init = check_init(
                cfg.init,
                OmegaConf.to_container(cfg.model, resolve=True),
                OmegaConf.to_container(cfg.method, resolve=True),
            )
    return cfg


def check_init(value: Any, model: Mapping[str, Any], method: Mapping[str, Any]) -> str:
    """``init=`` as a source (advpt.published), its encoder checked against the model and the rest by the
    method (``check_init_parts``, given the method's config), shapes only; one line if they do not fit."""
    from advpt.published import check_encoder, meta_vit, read_weights, resolve_source

    source = resolve_source(value, "init")
    weights = read_weights(source, "init", shapes_only=True)
    vit = meta_vit(model)
    check_encoder(weights.encoder, vit, model, "init", source)
    METHODS[str(method["name"])].check_init_parts(weights, vit, method, source)
    return source


def load_init(module: PretrainMethod, source: str, model: Mapping[str, Any]) -> list[str]:
    """Start ``module`` from ``init=``: the encoder, with every copy the method keeps of it (BYOL's
    target, an EMA), then what the method takes beyond it (``load_init_parts``). Returns what to say."""
    from advpt.models import Encoder
    from advpt.published import load_encoder, read_weights

    weights = read_weights(source, "init")
    vits = [m.vit for m in module.modules() if isinstance(m, Encoder)]
    notes = load_encoder(vits, weights.encoder, model, "init", source)
    return [*notes, module.load_init_parts(weights, source)]


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if fit(cfg, run_dir) is not None and rank_zero_only.rank == 0:
        print(summarise(run_dir))


def summarise(run_dir: Path) -> str:
    """The lines a pre-training run ends with: steps, final loss and kNN top-1, where it is, what next."""
    record = read_record(run_dir)
    loss = record.get("loss")
    steps = record.get("steps", 0)
    headline = f"{steps} step{'s' if steps != 1 else ''}, final train/loss " + (
        f"{loss:.4f}" if loss is not None else "not logged"
    )
    knn, robust = record.get("knn_top1"), record.get("knn_robust_top1")
    if knn is not None:
        headline += f", kNN top-1 {100 * knn:.2f} %" + (
            f" (robust {100 * robust:.2f} %)" if robust is not None else ""
        )
    text = summary("pretrain", run_dir, headline, f"advpt finetune pretrained={shown(run_dir)}")
    if record.get("attack") not in (None, "none") and record.get("eps"):
        from advpt.radii import shown as radius_shown

        # beside the headline: the radius used, and what it is in the paper's units
        radius = radius_shown(record["attack"], float(record["eps"]), int(record.get("img_size") or 224))
        first, rest = text.split("\n", 1)
        text = f"{first}\n  attack: {record['attack']} {radius}\n{rest}"
    return text

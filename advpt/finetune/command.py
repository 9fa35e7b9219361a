"""The ``finetune`` command: check the config, fit, export the classifier, print where it went."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from advpt.config import CONF_DIR, check_arguments, check_run, parse_number
from advpt.data import labelled
from advpt.errors import Diverged, UserError
from advpt.files import atomic_path, write_json
from advpt.finetune.module import FinetuneData, FineTuner
from advpt.finetune.pretrained import (
    load_backbone,
    load_encoder_state,
    load_published,
    published_model,
    resolve_pretrained,
)
from advpt.finetune.recipes import OPTIMIZERS, TRANSFORMS
from advpt.launch import processes
from advpt.models import architecture, model_config, timm_kwargs
from advpt.published import is_published, resolve_source, shown_source
from advpt.runs import number, read_record, shown, summary, write_record
from advpt.training.callbacks import diverged
from advpt.training.harness import begin, build_trainer
from advpt.training.harness import fit as fit_resumable
from advpt.training.sharding import full_state

SCRATCH_MODEL = "vit_mini_patch8_32"  # pretrained=none without model=: the CPU recipe's model


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``finetune`` config; fill in the pre-trained file and its model config.

    One layer decay remains: the top-level ``layer_decay`` (``optim.layer_decay`` is only its default).
    """
    with open_dict(cfg):
        check_arguments("finetune", cfg)
        labelled.check(cfg.data)
        optim = cfg.optim
        if optim.opt not in OPTIMIZERS:
            raise UserError(f"optim.opt={optim.opt} is not supported; choose one of {', '.join(OPTIMIZERS)}")
        if optim.transform not in TRANSFORMS:
            raise UserError(
                f"optim.transform={optim.transform} is unknown; choose one of {', '.join(TRANSFORMS)}"
            )
        if optim.opt == "lars" and float(optim.weight_decay) != 0:
            # timm's trust ratio divides by |g| + wd|w|, MAE's by |g + wd w|: the same only without decay
            raise UserError(
                f"optim.weight_decay={optim.weight_decay} with LARS: the linear probe's LARS equals MAE's "
                "only at weight_decay=0 (its protocol's value)"
            )
        gamma = parse_number(cfg.layer_decay, "layer_decay")
        if optim.opt != "adamw" and gamma != 1:
            raise UserError(
                f"layer_decay={cfg.layer_decay} does not apply to optim={optim.name}, which "
                + (
                    "trains the head alone on a frozen encoder"
                    if optim.get("frozen_encoder")
                    else "trains every layer at one lr (Steiner et al.)"
                )
                + ": leave layer_decay out, or use optim=adamw_lld"
            )
        cfg.layer_decay = gamma
        optim.pop("layer_decay", None)

        given = cfg.get("model")
        if is_published(cfg.pretrained):  # an MAE release .pth or timm:NAME, loaded into model=
            cfg.pretrained = resolve_source(cfg.pretrained, "pretrained")
            cfg.model = published_model(cfg.pretrained, given)
            check_run(cfg, touch_data)
            return cfg
        source = resolve_pretrained(cfg.pretrained)
        if source.path is None:
            model = OmegaConf.load(CONF_DIR / "model" / f"{SCRATCH_MODEL}.yaml") if given is None else given
            model = model_config(str(model.name), timm_kwargs(OmegaConf.to_container(model, resolve=True)))
        else:
            model = source.model
            if given is not None and architecture(
                OmegaConf.to_container(given, resolve=True)
            ) != architecture(model):
                raise UserError(
                    f"model={given.name} (img_size {given.img_size}) is not the architecture of pretrained="
                    f"{source.path} ({model['name']}, img_size {model['img_size']}): leave model= out, "
                    "it is read from the encoder"
                )
        cfg.pretrained = str(source.path) if source.path is not None else "none"
        cfg.model = model
        check_run(cfg, touch_data)
    return cfg


def export_classifier(
    module: FineTuner, cfg: DictConfig, directory: Path, state: dict[str, Any] | None = None
) -> Path:
    """``model.safetensors`` (timm state dict with head) and ``model.json``, the call that loads it.

    ``state``: the classifier's whole state dict, gathered beforehand by every process of a sharded run.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = module.classifier_state(state)  # a linear probe's norm folded into its head
    # drop_path_rate only acts in training: the description is of the architecture.
    kwargs = {k: v for k, v in module.net.kwargs.items() if k != "drop_path_rate"}
    spec = {
        "name": module.net.name,
        "kwargs": kwargs,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "num_classes": module.num_classes,
        "pretrained": str(cfg.pretrained),
        "layer_decay": float(cfg.layer_decay),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
    }
    write_json(directory / "model.json", spec)
    # the weights last: model.safetensors marks the run finished (advpt.runs)
    path = directory / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return path


def fit(cfg: DictConfig, run_dir: Path) -> FineTuner | None:
    """Fine-tune as configured, writing checkpoints, metrics, config and the classifier into ``run_dir``.

    Returns ``None`` when ``resume=auto`` finds the run already finished (nothing is written).
    """
    cfg = check(cfg, touch_data=False)
    data = FinetuneData(cfg.data, cfg.optim, image_size=int(cfg.model.img_size), seed=int(cfg.seed))
    if data.num_classes < 2:
        raise UserError(f"data={cfg.data.name} has {data.num_classes} classes: fine-tuning needs labels")
    with open_dict(cfg):
        cfg.num_classes = data.num_classes
    lengthen(cfg, len(data.train_source))
    if not begin(cfg, run_dir, "finetune"):
        return None
    if data.labelled is not None and rank_zero_only.rank == 0:
        labelled.write(run_dir, data.labelled)

    module = FineTuner(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=data.num_classes,
        layer_decay=float(cfg.layer_decay),
        batch_size=int(cfg.data.batch_size),
        seed=int(cfg.seed),
        activation_checkpointing=bool(cfg.activation_checkpointing),
    )
    notes: list[str] = []
    if is_published(cfg.pretrained):
        notes = load_published(module.vit, cfg.pretrained, OmegaConf.to_container(cfg.model, resolve=True))
    elif cfg.pretrained != "none":
        load_backbone(module.vit, load_encoder_state(Path(cfg.pretrained)))
    if rank_zero_only.rank == 0:
        for line in [*notes, loaded(cfg)]:
            print(f"advpt finetune: {line}", flush=True)
    trainer = build_trainer(cfg, run_dir)
    with processes(trainer, "finetune", run_dir):
        fit_resumable(trainer, module, data, cfg.resume)
        # A run that stops mid-epoch (max_steps) is still scored on its final weights.
        if data.val_source is not None and module.validated_at != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)
        state = full_state(module.vit)  # every process, before they end: FSDP gathers the shards
    stopped = diverged(trainer)
    if stopped is not None:  # every process agrees; the first says so, nothing non-finite is exported
        if trainer.is_global_zero:
            raise Diverged(stopped.message("finetune"))
        return None
    if trainer.is_global_zero:
        export_classifier(module, cfg, run_dir, state)
        top1 = number(trainer.callback_metrics, "val/top1")
        write_record(run_dir, "finetune", trainer.global_step, val_top1=top1, pretrained=str(cfg.pretrained))
    return module


VALIDATIONS = 25
"""Validations of a run whose epochs were raised to hold ``optim.min_steps``: enough points for the
convergence check's tail (its last 20 %), few enough that scoring the test split does not cost more
than training on a handful of labels."""


def world_size(trainer: DictConfig) -> int:
    """Processes a run will take, from the Trainer settings (``auto`` on a CPU: one)."""
    devices = trainer.get("devices", 1)
    devices = len(devices) if isinstance(devices, list | ListConfig) else devices
    devices = int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1
    return max(1, devices) * max(1, int(trainer.get("num_nodes", 1) or 1))


def lengthen(cfg: DictConfig, images: int) -> None:
    """``optim.min_steps``: a schedule given in epochs holds at least this many optimiser steps.

    On a small training set (a few labels per class) an epoch is one or two steps, and a recipe's
    epochs would stop long before the model has learnt: the epochs are raised until they hold the
    steps, validation is spread to :data:`VALIDATIONS` points, and the run says so. A schedule in
    steps (``trainer.max_steps`` > 0) is left as it is.
    """
    min_steps = int(cfg.optim.get("min_steps", 0) or 0)
    if min_steps <= 0 or int(cfg.trainer.get("max_steps", -1) or -1) > 0:
        return
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    batches = labelled.steps_per_epoch(images, int(cfg.data.batch_size), world_size(cfg.trainer))
    per_epoch = max(1, batches // accumulate)
    epochs = int(cfg.trainer.max_epochs)
    if epochs * per_epoch >= min_steps:
        return
    every = max(1, labelled.epochs_for(min_steps, per_epoch) // VALIDATIONS)
    raised = every * labelled.epochs_for(labelled.epochs_for(min_steps, per_epoch), every)
    with open_dict(cfg):
        cfg.trainer.max_epochs = raised
        cfg.trainer.check_val_every_n_epoch = every
    if rank_zero_only.rank == 0:
        print(
            f"advpt finetune: {images} training images are {per_epoch} step{'s' if per_epoch != 1 else ''} "
            f"per epoch: {epochs} epochs raised to {raised} ({raised * per_epoch} steps >= optim.min_steps="
            f"{min_steps}), validating every {every} epoch{'s' if every != 1 else ''}",
            flush=True,
        )


def loaded(cfg: DictConfig) -> str:
    """Which encoder a run starts from, in words."""
    model = f"{cfg.model.name}, {cfg.model.img_size} px, patch {cfg.model.patch_size}"
    if cfg.pretrained == "none":
        return f"no encoder loaded: training {model} from scratch (pretrained=none)"
    return f"loaded encoder {shown_source(str(cfg.pretrained))} ({model})"


def summarise(run_dir: Path, overrides: list[str] | None = None) -> str:
    """The lines a fine-tuning run ends with: steps and val top-1, where it is, what to run next.

    A run whose validation top-1 still climbs over its last 20 % (the report's convergence rule) says so,
    with ``overrides`` (the command line) run again at twice the steps into a new folder.
    """
    from advpt.report.collect import val_curve
    from advpt.report.convergence import FRACTION, THRESHOLD, gain, unconverged

    record = read_record(run_dir)
    steps, top1 = record.get("steps", 0), record.get("val_top1")
    headline = f"{steps} step{'s' if steps != 1 else ''}, val top-1 " + (
        f"{100 * top1:.2f} %" if top1 is not None else "not measured (the dataset has no test split)"
    )
    lines = [summary("finetune", run_dir, headline, f"advpt evaluate checkpoint={shown(run_dir)}")]
    subset = labelled.read(run_dir)
    if subset:
        lines.append(f"  labels: {labelled.described(subset)}, listed in {shown(run_dir / labelled.RECORD)}")
    gained = gain(val_curve(run_dir))
    if unconverged(gained):
        kept = [
            o
            for o in overrides or []
            if not o.split("=", 1)[0].lstrip("+~").startswith(("optim.min_steps", "hydra.run.dir", "resume"))
        ]
        longer = [
            "advpt finetune",
            *kept,
            f"optim.min_steps={2 * int(steps)}",
            f"hydra.run.dir={shown(Path(f'{run_dir}-longer'))}",
        ]
        lines.append(
            f"  NOT CONVERGED: val top-1 still gained {100 * gained:+.2f} points over the last "
            f"{100 * FRACTION:g} % of the run (more than {100 * THRESHOLD:g}); twice the steps: "
            + " ".join(longer)
        )
    return "\n".join(lines)


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if fit(cfg, run_dir) is not None and rank_zero_only.rank == 0:
        print(summarise(run_dir, [shlex.quote(o) for o in HydraConfig.get().overrides.task]))

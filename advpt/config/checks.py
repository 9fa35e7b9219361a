"""The checks of a composed config, per command: ranges, the attack, the model, data, resume, machine.

Every check raises :class:`UserError` with one line that names the bad value and what is accepted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from advpt import names
from advpt.config.machine import check_cpu_processes, check_environment, check_trainer_arguments
from advpt.config.ranges import RANGES, check_range, parse_number, positive_int
from advpt.errors import UserError


def _image_dim(cfg: DictConfig) -> int:
    size = int(cfg.model.img_size)
    return 3 * size * size


def check_attack(cfg: DictConfig) -> None:
    """Resolve the radius (``eps`` or the attack's default) into ``cfg.eps`` and check the attack."""
    attack = cfg.attack
    if attack.name not in names.ATTACKS:
        raise UserError(f"unknown attack {attack.name!r}; choose one of {', '.join(names.ATTACKS)}")
    raw = cfg.eps if cfg.eps is not None else attack.default_eps
    eps = parse_number(raw, "eps")
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps={raw} is out of range: an attack radius must be a finite number >= 0")
    if attack.name == "linf" and eps > 1:
        raise UserError(
            f"eps={raw} is not a valid l_inf radius for images in [0,1]: use 0 <= eps <= 1, written k/255 (eps=4/255)"
        )
    if attack.name == "l2" and eps > math.sqrt(_image_dim(cfg)):
        raise UserError(
            f"eps={raw} exceeds the largest l2 distance between two {cfg.model.img_size}px images "
            f"({math.sqrt(_image_dim(cfg)):.1f}); the paper's l2 radii are 0.25 to 8"
        )
    steps = attack.steps
    positive_int(steps, "attack.steps", "the number of PGD steps must be")
    if attack.step_size is not None:
        alpha = parse_number(attack.step_size, "attack.step_size")
        if alpha <= 0:
            raise UserError(f"attack.step_size={attack.step_size} must be > 0 (or null for 5*eps/8)")
        attack.step_size = alpha
    cfg.eps = eps
    from advpt.radii import to_paper

    with open_dict(cfg):  # recorded beside the radius used: its equivalent at the paper's 224 px
        cfg.eps_224 = to_paper(attack.name, eps, int(cfg.model.img_size)) if attack.name != "none" else 0.0


def attack_kwargs(cfg: DictConfig) -> dict[str, Any] | None:
    """Arguments of :class:`advpt.attacks.Attack` for a checked config (``None`` = nominal)."""
    if cfg.attack.name == "none" or cfg.eps == 0:
        return None
    return {
        "norm": cfg.attack.name,
        "eps": float(cfg.eps),
        "steps": int(cfg.attack.steps),
        "step_size": cfg.attack.step_size,
        "random_start": bool(cfg.attack.random_start),
    }


def check_data(cfg: DictConfig) -> None:
    from advpt.data.sources import SOURCES, check_source

    if cfg.data.name not in SOURCES:
        raise UserError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(SOURCES)}")
    positive_int(cfg.data.batch_size, "data.batch_size")
    if cfg.data.get("num_workers") is not None:  # null: sized to the machine (advpt.config.machine)
        positive_int(cfg.data.num_workers, "data.num_workers", low=0)
    check_source(cfg.data)


def check_pretrain(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``pretrain`` config and fill in derived values (``eps``); returns it."""
    with open_dict(cfg):
        check_arguments("pretrain", cfg)
        if cfg.method.name not in names.METHODS:
            raise UserError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(names.METHODS)}")
        check_run(cfg, touch_data)
    return cfg


def check_run(cfg: DictConfig, touch_data: bool = True) -> None:
    """What every training command checks after :func:`check_arguments`: the machine, resume, data."""
    check_environment(cfg.trainer)
    model = cfg.get("model")
    if model is not None and model.get("name"):
        import timm

        if not timm.is_model(str(model.name)):
            import difflib

            name = str(model.name)
            close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
            near = close or timm.list_models(f"{name.split('_')[0]}_*")[:4] or timm.list_models("vit_*")[:4]
            raise UserError(
                f"model.name={name} is not a timm model ({'closest' if close else 'e.g.'}: {', '.join(near)}; "
                "timm.list_models() names them all)"
            )
    if cfg.resume is not None and str(cfg.resume) != "auto":
        from advpt.resume import read_progress

        read_progress(Path(str(cfg.resume)))  # one line if it is not a readable checkpoint
    if touch_data:
        check_data(cfg)


def check_arguments(command: str, cfg: DictConfig) -> None:
    """The checks of a composed config that import nothing heavy: ranges, the attack, model geometry,
    Trainer argument names, that a resume file and ``latest`` exist. Fills in ``eps`` for pretrain."""
    if command == "pretrain":
        check_attack(cfg)
        monitor = cfg.get("monitor") or {}
        if monitor.get("attack") and monitor.attack.name not in names.NORMS:
            raise UserError(
                f"monitor.attack.name={monitor.attack.name} is invalid: choose one of {', '.join(names.NORMS)}"
            )
    for key in ("compile", "activation_checkpointing"):
        if command in ("pretrain", "finetune") and not isinstance(cfg.get(key, False), bool):
            raise UserError(f"{key}={cfg[key]} is invalid: expected true or false")
    for key, rule in RANGES.get(command, {}).items():
        check_range(cfg, key, rule)
    if command in ("pretrain", "finetune"):
        model = cfg.get("model")
        if model is not None and model.img_size % model.patch_size:
            raise UserError(
                f"model.img_size={model.img_size} is not a multiple of model.patch_size={model.patch_size}"
            )
        check_trainer_arguments(cfg.trainer)
        if str(cfg.trainer.get("accelerator")) == "cpu":  # before Lightning is imported (under 2 s)
            check_cpu_processes(cfg.trainer.get("devices"))
        if cfg.resume is not None and str(cfg.resume) != "auto" and not Path(str(cfg.resume)).is_file():
            raise UserError(
                f"resume={cfg.resume} is not a checkpoint file (give a run's checkpoints/last.ckpt, or auto)"
            )
    from advpt.runs import INPUTS, resolve_latest_input

    if command in INPUTS and str(cfg.get(INPUTS[command][0])) == "latest":
        resolve_latest_input(command)

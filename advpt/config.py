"""Configuration: where the configs live, composing them, and checking them before any work starts.

Every check raises :class:`UserError` with one line that names the bad value and what is accepted.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import socket
import warnings
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from advpt.errors import UserError

_PACKAGED = Path(__file__).resolve().parent / "conf"
_REPO = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _PACKAGED if _PACKAGED.is_dir() else _REPO

MAX_VALIDATED_JOBS = 512


def parse_number(value: Any, key: str) -> float:
    """A float from ``0.5``, ``"0.5"`` or a fraction such as ``"2/255"``."""
    if isinstance(value, bool):
        raise UserError(f"{key}={value} is not a number")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{key}={value!r} is not a number (write e.g. {key}=0.5 or {key}=4/255)") from None


def _image_dim(cfg: DictConfig) -> int:
    size = int(cfg.model.img_size)
    return 3 * size * size


def check_attack(cfg: DictConfig) -> None:
    """Resolve the radius (``eps`` or the attack's default) into ``cfg.eps`` and check the attack."""
    attack = cfg.attack
    if attack.name not in ("none", "linf", "l2"):
        raise UserError(f"unknown attack {attack.name!r}; choose one of none, linf, l2")
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
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"attack.steps={steps} is invalid: the number of PGD steps must be an integer >= 1")
    if attack.step_size is not None:
        alpha = parse_number(attack.step_size, "attack.step_size")
        if alpha <= 0:
            raise UserError(f"attack.step_size={attack.step_size} must be > 0 (or null for 5*eps/8)")
        attack.step_size = alpha
    cfg.eps = eps


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


def check_trainer(trainer_cfg: DictConfig) -> None:
    import lightning as L

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    for key in trainer_cfg:
        if key not in accepted:
            raise UserError(
                f"trainer.{key} is not a Lightning Trainer argument (see lightning.Trainer's documentation)"
            )
    check_environment(trainer_cfg)


def _hardware() -> str:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"this machine has {os.cpu_count()} CPU cores and {gpus} GPU{'s' if gpus != 1 else ''}"


def check_environment(trainer_cfg: DictConfig) -> None:
    """Accelerator, devices, strategy and precision this machine can run, and a reachable MASTER_ADDR.

    Lightning's own checks decide (a Trainer is built and dropped; it starts no process); its
    message becomes one line with what the machine has.
    """
    import logging

    import lightning as L

    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision", "sync_batchnorm")
    kwargs = {k: trainer_cfg[k] for k in keys if k in trainer_cfg}
    quiet = logging.getLogger("lightning.pytorch")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    except Exception as e:  # Lightning raises MisconfigurationException, ValueError, RuntimeError, ...
        text = " ".join(str(e).split()).split(". ")[0].rstrip(".")
        settings = ", ".join(f"trainer.{k}={v}" for k, v in kwargs.items() if k != "sync_batchnorm")
        raise UserError(f"{settings} cannot run here: {text}; {_hardware()}") from None
    finally:
        quiet.level = level
    from lightning.pytorch.accelerators import CPUAccelerator

    if (
        kwargs.get("sync_batchnorm")
        and isinstance(probe.accelerator, CPUAccelerator)
        and probe.world_size > 1
    ):
        raise UserError(
            "trainer.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not run in CPU processes "
            "(drop it on CPU; each process then normalises its own batch)"
        )
    address = os.environ.get("MASTER_ADDR")
    if address:
        try:
            socket.getaddrinfo(address, None)
        except OSError:
            raise UserError(
                f"MASTER_ADDR={address} cannot be resolved from this machine: give the first node's host "
                "name or address (or unset MASTER_ADDR for a single-node run)"
            ) from None


def _positive_int(value: Any, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value} is invalid: expected an integer >= 1")


def check_data(cfg: DictConfig) -> None:
    from advpt.data.sources import SOURCES, check_source

    if cfg.data.name not in SOURCES:
        raise UserError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(SOURCES)}")
    _positive_int(cfg.data.batch_size, "data.batch_size")
    if not isinstance(cfg.data.num_workers, int) or cfg.data.num_workers < 0:
        raise UserError(f"data.num_workers={cfg.data.num_workers} is invalid: expected an integer >= 0")
    check_source(cfg.data)


def check_pretrain(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``pretrain`` config and fill in derived values (``eps``); returns it."""
    from advpt.methods import METHODS

    with open_dict(cfg):
        if cfg.method.name not in METHODS:
            raise UserError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
        check_attack(cfg)
        if not isinstance(cfg.get("compile", False), bool):
            raise UserError(f"compile={cfg.compile} is invalid: expected true or false")
        if cfg.method.name == "mae" and not 0 < float(cfg.method.mask_ratio) < 1:
            raise UserError(f"method.mask_ratio={cfg.method.mask_ratio} must be strictly between 0 and 1")
        check_run(cfg, touch_data)
    return cfg


def check_run(cfg: DictConfig, touch_data: bool = True) -> None:
    """What every training command checks: model geometry, Trainer arguments, checkpointing, resume, data."""
    if cfg.model.img_size % cfg.model.patch_size:
        raise UserError(
            f"model.img_size={cfg.model.img_size} is not a multiple of model.patch_size={cfg.model.patch_size}"
        )
    check_trainer(cfg.trainer)
    _positive_int(cfg.checkpoint_every_n_steps, "checkpoint_every_n_steps")
    if cfg.resume is not None and str(cfg.resume) != "auto":
        from advpt.launch import read_progress

        if not Path(str(cfg.resume)).is_file():
            raise UserError(
                f"resume={cfg.resume} is not a checkpoint file (give a run's checkpoints/last.ckpt, or auto)"
            )
        read_progress(Path(str(cfg.resume)))  # one line if it is not a readable checkpoint
    if touch_data:
        check_data(cfg)


# -- composing ---------------------------------------------------------------------------------
def _expand_sweeps(overrides: list[str]) -> Iterable[list[str]]:
    """Every job of a multirun, as plain override lists (Hydra's basic sweeper's cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return itertools.product(*choices)


def compose(command: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
        return hydra_compose(command, overrides=overrides)


def validate(command: str, overrides: list[str], multirun: bool, check: Any = None) -> None:
    """Compose and check every job the command line describes; raise :class:`UserError` on the first bad one.

    ``check(cfg, touch_data)`` is the command's own semantic check (paths, ranges); data sources are
    touched once per distinct data config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        jobs = (
            list(itertools.islice(_expand_sweeps(overrides), MAX_VALIDATED_JOBS)) if multirun else [overrides]
        )
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
            seen_data: set[str] = set()
            for job in jobs:
                cfg = hydra_compose(command, overrides=list(job))
                data_key = OmegaConf.to_yaml(cfg.data) if "data" in cfg else ""
                if check is not None:
                    check(cfg, touch_data=data_key not in seen_data)
                seen_data.add(data_key)
    except UserError:
        raise
    except Exception as e:  # Hydra / OmegaConf composition errors: reword as one line
        raise UserError(describe_hydra_error(e, command)) from None


def describe_hydra_error(e: BaseException, command: str) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        options = ", ".join(sorted(e.options or [])) if e.options else None
        if group and options:
            return f"unknown {group} option {name!r}; choose one of: {options}"
        return str(e).splitlines()[0]
    cause = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    key = None
    if "Key '" in str(cause):
        key = str(cause).split("Key '", 1)[1].split("'", 1)[0]
    if text.startswith("Could not override") or text.startswith("Could not append") or key:
        name = text.split("'", 2)[1] if "'" in text else key
        return (
            f"unknown key {name!r}: it is not in the {command} config "
            f"(list the accepted keys with `advpt {command} --cfg job`; new Trainer arguments as +trainer.NAME=VALUE)"
        )
    if text.startswith("Ambiguous value for argument"):
        arg = text.split("'", 2)[1]
        return f"{arg!r} lists several values: add -m (--multirun) to run one job per value"
    first = text.split(". ")[0] if text else type(e).__name__
    return first.replace("\n", " ")

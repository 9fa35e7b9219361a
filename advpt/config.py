"""Configuration: where the configs live, composing them, and checking them before any work starts.

Every check raises :class:`UserError` with one line that names the bad value and what is accepted.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import os
import re
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

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


def trainer_arguments() -> set[str]:
    """The keyword arguments of ``lightning.Trainer``, read from its source without importing Lightning
    (importing it takes seconds); falls back on the import if the source is not where it should be."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lightning")  # a top-level package: found, not imported
    source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py" if spec and spec.origin else None
    try:
        tree = ast.parse(source.read_text())  # type: ignore[union-attr]
        trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
        init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        names = {a.arg for a in init.args.args + init.args.kwonlyargs}
    except (OSError, AttributeError, StopIteration, SyntaxError):
        import lightning as L

        names = set(inspect.signature(L.Trainer.__init__).parameters)
    return names - {"self", "logger", "callbacks"}


def check_trainer_arguments(trainer_cfg: DictConfig) -> None:
    accepted = trainer_arguments()
    for key in trainer_cfg:
        if key not in accepted:
            raise UserError(
                f"trainer.{key} is not a Lightning Trainer argument (see lightning.Trainer's documentation)"
            )


def check_trainer(trainer_cfg: DictConfig) -> None:
    check_trainer_arguments(trainer_cfg)
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
        check_arguments("pretrain", cfg)
        if cfg.method.name not in METHODS:
            raise UserError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
        check_run(cfg, touch_data)
    return cfg


def check_run(cfg: DictConfig, touch_data: bool = True) -> None:
    """What every training command checks after :func:`check_arguments`: the machine, resume, data."""
    check_environment(cfg.trainer)
    if cfg.resume is not None and str(cfg.resume) != "auto":
        from advpt.launch import read_progress

        read_progress(Path(str(cfg.resume)))  # one line if it is not a readable checkpoint
    if touch_data:
        check_data(cfg)


# -- the checks that need no heavy import: run on every job before torch / Lightning / timm load ---
@dataclass(frozen=True)
class Range:
    """What a numeric setting accepts: a number (or an integer) between two bounds, each open or closed.

    ``each``: the setting is a list and every item must be in range; ``special``: values also accepted
    (Lightning's -1 = no limit, null = default); ``text``: says what is accepted, instead of the bounds.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    each: bool = False
    special: tuple[Any, ...] = ()
    text: str | None = None

    def accepts(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.low is None or value > self.low or (value == self.low and not self.low_open))
            and (self.high is None or value < self.high or (value == self.high and not self.high_open))
        )

    def describe(self) -> str:
        if self.text:
            return self.text
        what = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = f"{'<' if self.high_open else '<='} {self.high:g}"
        extra = " or ".join("null" if v is None else str(v) for v in self.special)
        return f"expected {'each item to be ' if self.each else ''}{what} {bounds}" + (
            f" (or {extra})" if extra else ""
        )


def check_range(cfg: DictConfig, key: str, rule: Range) -> None:
    """One setting against its :class:`Range` (absent keys are skipped: not every method has every key)."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing or value in rule.special:
        return
    items = (
        list(value) if rule.each and isinstance(value, Iterable) and not isinstance(value, str) else [value]
    )
    for item in items:
        if rule.integer:
            good = isinstance(item, int) and not isinstance(item, bool) and rule.accepts(item)
            if not good:
                raise UserError(f"{key}={_show(value)} is invalid: {rule.describe()}")
            continue
        if not rule.accepts(parse_number(item, key)):
            raise UserError(f"{key}={_show(value)} is out of range: {rule.describe()}")


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return str(value).replace(" ", "")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): rates, warm-up shares, smoothing, drop path
PROBABILITY = Range(0, 1)
COUNT = Range(1, integer=True)
INDEX = Range(0, integer=True)
OPTIONAL_COUNT = Range(1, integer=True, special=(None,))
LAYER_DECAY = Range(
    0,
    1,
    low_open=True,
    text="use 0 < γ <= 1 (1 = plain fine-tuning; the paper sweeps 0.65, 0.75, 0.85, 0.95)",
)

# Every numeric hyper-parameter of each command, checked before anything is imported or written.
_TRAINING = {
    "seed": INDEX,
    "checkpoint_every_n_steps": COUNT,
    "data.batch_size": COUNT,
    "data.num_workers": INDEX,
    "trainer.max_epochs": Range(1, integer=True, special=(-1, None)),
    "trainer.max_steps": Range(1, integer=True, special=(-1, None)),
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.log_every_n_steps": COUNT,
    "trainer.gradient_clip_val": Range(0, special=(None,)),
    # data=shards
    "data.epoch_samples": OPTIONAL_COUNT,
    "data.shuffle_buffer": COUNT,
    "data.decode_min_side": Range(0, integer=True, special=(None,)),
}
RANGES: dict[str, dict[str, Range]] = {
    "pretrain": {
        **_TRAINING,
        "method.base_lr": POSITIVE,
        "method.weight_decay": NON_NEGATIVE,
        "method.betas": Range(0, 1, high_open=True, each=True),
        "method.warmup_fraction": FRACTION,
        "method.min_lr": NON_NEGATIVE,
        "method.mask_ratio": Range(0, 1, low_open=True, high_open=True),
        "method.momentum": PROBABILITY,  # BYOL's target decay at step 0
        "method.ema_decay": FRACTION,
        "method.label_smoothing": FRACTION,
        "method.drop_path_rate": FRACTION,
        "method.mixup": NON_NEGATIVE,
        "method.cutmix": NON_NEGATIVE,
        "method.views.crop_scale": Range(0, 1, low_open=True, each=True),
    },
    "finetune": {
        **_TRAINING,
        "layer_decay": LAYER_DECAY,
        "optim.layer_decay": LAYER_DECAY,
        "optim.lr": POSITIVE,
        "optim.lr_batch": COUNT,
        "optim.betas": Range(0, 1, high_open=True, each=True),
        "optim.momentum": FRACTION,
        "optim.weight_decay": NON_NEGATIVE,
        "optim.warmup_fraction": FRACTION,
        "optim.min_lr": NON_NEGATIVE,
        "optim.gradient_clip_val": Range(0, special=(None,)),
        "optim.drop_path_rate": FRACTION,
        "optim.scale": Range(0, 1, low_open=True, each=True),
        "optim.hflip": PROBABILITY,
        "optim.re_prob": PROBABILITY,
        "optim.mixup": NON_NEGATIVE,
        "optim.cutmix": NON_NEGATIVE,
        "optim.label_smoothing": FRACTION,
    },
    "evaluate": {
        "seed": INDEX,
        "batch_size": COUNT,
        "num_workers": Range(0, integer=True, special=(None,)),
        "max_images": OPTIONAL_COUNT,
        "subset_max_images": OPTIONAL_COUNT,
        "crop_pct": Range(0, 1, low_open=True),
        "robust.steps": COUNT,
        "robust.restarts": COUNT,
        "robust.step_size": Range(0, low_open=True, special=(None,)),
        "robust.max_images": OPTIONAL_COUNT,
    },
    "visualize": {"components": Range(1, integer=True, text="expected an integer >= 1 (the paper draws 28)")},
    "shards": {
        "shard_size": COUNT,
        "max_side": OPTIONAL_COUNT,
        "quality": Range(1, 100, integer=True, special=(None,)),
    },
}


def check_arguments(command: str, cfg: DictConfig) -> None:
    """The checks of a composed config that import nothing heavy: ranges, the attack, model geometry,
    Trainer argument names, that a resume file and ``latest`` exist. Fills in ``eps`` for pretrain."""
    if command == "pretrain":
        check_attack(cfg)
        if not isinstance(cfg.get("compile", False), bool):
            raise UserError(f"compile={cfg.compile} is invalid: expected true or false")
    for key, rule in RANGES.get(command, {}).items():
        check_range(cfg, key, rule)
    if command in ("pretrain", "finetune"):
        model = cfg.get("model")
        if model is not None and model.img_size % model.patch_size:
            raise UserError(
                f"model.img_size={model.img_size} is not a multiple of model.patch_size={model.patch_size}"
            )
        check_trainer_arguments(cfg.trainer)
        if cfg.resume is not None and str(cfg.resume) != "auto" and not Path(str(cfg.resume)).is_file():
            raise UserError(
                f"resume={cfg.resume} is not a checkpoint file (give a run's checkpoints/last.ckpt, or auto)"
            )
    from advpt.runs import INPUTS, resolve_latest

    if command in INPUTS and str(cfg.get(INPUTS[command][0])) == "latest":
        resolve_latest(command)


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


def compose(command: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
        return hydra_compose(command, overrides=overrides, return_hydra_config=hydra)


def validate(command: str, overrides: list[str], multirun: bool, module: str | None = None) -> None:
    """Compose and check every job the command line describes; raise :class:`UserError` on the first bad one.

    Every job is composed and given :func:`check_arguments` first; only then is ``module`` (the
    command's, which imports torch, Lightning, timm) imported for its ``check(cfg, touch_data)``:
    the machine, paths, data. Data sources are touched once per distinct data config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        jobs = (
            list(itertools.islice(_expand_sweeps(overrides), MAX_VALIDATED_JOBS)) if multirun else [overrides]
        )
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
            configs = [hydra_compose(command, overrides=list(job)) for job in jobs]
    except Exception as e:  # Hydra / OmegaConf composition errors: reword as one line
        raise UserError(describe_hydra_error(e, command)) from None
    try:
        for cfg in configs:
            with open_dict(cfg):
                check_arguments(command, cfg)
        check = getattr(importlib.import_module(module), "check", None) if module else None
        if check is None:
            return
        seen_data: set[str] = set()
        for cfg in configs:
            data_key = OmegaConf.to_yaml(cfg.data) if "data" in cfg else ""
            check(cfg, touch_data=data_key not in seen_data)
            seen_data.add(data_key)
    except UserError:
        raise
    except Exception as e:  # an interpolation that does not resolve, ...
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


# -- resolvers of the command configs (registered when advpt.cli is imported) -------------------
def safe_dirname(overrides: Any) -> str:
    """Hydra's ``override_dirname`` (``method-mae+eps-4/255``) as one folder name that is also a plain
    Hydra value, so ``pretrained=<that folder>`` can be typed as is: ``/`` and anything else Hydra's
    override grammar or a shell would read (``=``, ``,``, quotes, brackets, spaces) becomes ``_``;
    names are cut at 200 characters (the job number before them keeps them apart)."""
    return re.sub(r"[^A-Za-z0-9_.+\-@:%]", "_", str(overrides))[:200]


def command_groups() -> str:
    """The config groups the running command composes, each with its options (``--help``; "" if none)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    lines = []
    for group, chosen in sorted(choices.items()):
        # Hydra's own groups, and recipe/<command>, which recipe= picks, are not typed by users.
        if group.startswith("hydra/") or "/" in group or "@" in group:
            continue
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        listed = ", ".join(f"{o}*" if o == chosen else o for o in options)
        note = "  (default: read from the encoder)" if chosen is None else ""
        lines.append(f"{group}: {listed}{note}")
    if not lines:
        return ""
    if "model" in choices:
        lines.append("(model.name in the config is the timm architecture that the model option builds)")
    return "\n".join(["", "== Groups: group=option (* = current choice) ==", *lines, ""])


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
    OmegaConf.register_new_resolver("command_groups", command_groups, replace=True)

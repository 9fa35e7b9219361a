"""What each numeric setting accepts (``RANGES``), and the checks of numbers and counts.

Imports nothing heavy: these run on every job of a command line before torch, Lightning or timm load.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from advpt.errors import UserError


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


def positive_int(value: Any, key: str, what: str = "expected", low: int = 1) -> int:
    """``value`` if it is an integer >= ``low`` (not a bool); else one line naming ``key``
    (``what`` begins the explanation: "the number of PGD steps must be")."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{key}={value} is invalid: {what} an integer >= {low}")
    return value


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
    "data.num_workers": Range(0, integer=True, special=(None,)),
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
        # DINO, MoCo v3, SimCLR
        "method.views.counts.dino_local": Range(0, integer=True),
        "method.weight_decay_end": NON_NEGATIVE,
        "method.student_temperature": POSITIVE,
        "method.warmup_teacher_temperature": POSITIVE,
        "method.teacher_temperature": POSITIVE,
        "method.teacher_temperature_warmup_fraction": FRACTION,
        "method.center_momentum": FRACTION,
        "method.freeze_last_layer_fraction": FRACTION,
        "method.clip_grad": Range(0, low_open=True, special=(None,)),
        "method.temperature": POSITIVE,
        # monitor=knn (advpt.training.monitor)
        "monitor.every_n_epochs": COUNT,
        "monitor.bank_size": OPTIONAL_COUNT,
        "monitor.eval_size": OPTIONAL_COUNT,
        "monitor.k": COUNT,
        "monitor.temperature": POSITIVE,
        "monitor.batch_size": COUNT,
        "monitor.attack.eps": NON_NEGATIVE,
        "monitor.attack.steps": COUNT,
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
        "optim.min_steps": INDEX,
        "optim.trust_coefficient": Range(0, low_open=True),
        "data.labels_per_class": OPTIONAL_COUNT,
        "data.label_fraction": Range(0, 1, low_open=True, special=(None,)),
        "data.labels_seed": Range(0, integer=True, special=(None,)),
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

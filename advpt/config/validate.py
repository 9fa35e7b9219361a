"""Checking a whole command line before any work: every job of a sweep composed and checked, the
cheap checks first, then the command's own (which imports torch, Lightning, timm)."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterable

from omegaconf import OmegaConf, open_dict

from advpt.config.checks import check_arguments
from advpt.config.compose import compose_all, describe_hydra_error
from advpt.errors import UserError

MAX_VALIDATED_JOBS = 512


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


def validate(command: str, overrides: list[str], multirun: bool, module: str | None = None) -> None:
    """Compose and check every job the command line describes; raise :class:`UserError` on the first bad one.

    Every job is composed and given :func:`check_arguments` first; only then is ``module`` (the
    command's, which imports torch, Lightning, timm) imported for its ``check(cfg, touch_data)``:
    the machine, paths, data. Data sources are touched once per distinct data config.
    """
    try:
        jobs = (
            list(itertools.islice(_expand_sweeps(overrides), MAX_VALIDATED_JOBS)) if multirun else [overrides]
        )
        configs = compose_all(command, [list(job) for job in jobs])
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

"""What runs exist and what they hold: the one meaning of ``latest`` and the end-of-run summary.

A run directory of a command is *finished* when it holds the command's product (written last, by the
first process only) and, if it has a ``run.json``, that record says it trained at least one step.
``latest`` is the finished run whose product was written last, under ``outputs/<command>/`` and
``multirun/<command>/`` of the working directory. Nothing here imports torch: the command line
resolves ``latest`` before any heavy import.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advpt.errors import UserError
from advpt.files import write_json

ROOTS = ("outputs", "multirun")
# The file each command writes last: its presence marks a finished run.
PRODUCTS = {
    "pretrain": "encoder.safetensors",
    "finetune": "model.safetensors",
    "evaluate": "results.json",
    "visualize": "filters.png",
}
RECORD = "run.json"  # {"command", "steps", headline numbers}: written beside the product


@dataclass(frozen=True)
class Run:
    """A finished run directory of ``command``."""

    directory: Path
    command: str

    @property
    def product(self) -> Path:
        return self.directory / PRODUCTS[self.command]


def read_record(directory: Path) -> dict[str, Any]:
    """``run.json`` of a run directory ({} when absent or unreadable)."""
    try:
        record = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(directory: Path, command: str, steps: int, **headline: Any) -> Path:
    """Write ``run.json`` (atomically): the command, the optimiser steps it trained, its headline numbers."""
    return write_json(Path(directory) / RECORD, {"command": command, "steps": int(steps), **headline})


def is_finished(directory: Path, command: str) -> bool:
    directory = Path(directory)
    if not (directory / PRODUCTS[command]).is_file():
        return False
    steps = read_record(directory).get("steps")
    return not (isinstance(steps, int) and steps < 1)  # a run that trained nothing is not a result


def finished_runs(command: str, cwd: Path | None = None) -> list[Run]:
    """Finished runs of ``command`` under ``outputs/`` and ``multirun/`` here, oldest product first."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    product = PRODUCTS[command]
    found = {
        p.parent.resolve()
        for root in ROOTS
        for p in (cwd / root / command).glob(f"**/{product}")
        if p.is_file() and ".hydra" not in p.parts
    }
    runs = [Run(d, command) for d in found if is_finished(d, command)]
    return sorted(runs, key=lambda r: r.product.stat().st_mtime)


def latest(commands: str | Sequence[str], cwd: Path | None = None) -> Run | None:
    """The newest finished run of the first of ``commands`` that has one (``None``: no run at all)."""
    for command in [commands] if isinstance(commands, str) else commands:
        runs = finished_runs(command, cwd)
        if runs:
            return runs[-1]
    return None


# What ``latest`` reads for each command that takes a run as input: the setting, the commands whose
# runs it accepts (in order of preference), what else the setting accepts.
INPUTS = {
    "finetune": (
        "pretrained",
        ("pretrain",),
        " (a pretrain run directory, encoder.safetensors or last.ckpt) or pretrained=none",
    ),
    "evaluate": ("checkpoint", ("finetune",), " (a fine-tuning run directory or its model.safetensors)"),
    "visualize": ("checkpoint", ("pretrain", "finetune"), " (a run directory or a weights file)"),
}


def resolve_latest_input(command: str) -> Path:
    """What ``latest`` means as ``command``'s input (``advpt finetune pretrained=latest``: the newest
    pretrain run's encoder): the product file of :func:`latest` of the commands it reads from, or one
    line saying what to run first."""
    key, sources, accepted = INPUTS[command]
    run = latest(sources)
    if run is None:
        where = " or ".join(f"{root}/{sources[0]}/" for root in ROOTS)
        raise UserError(
            f"{key}=latest found no finished `advpt {sources[0]}` run under {where} in {Path.cwd()}: "
            f"run advpt {sources[0]} first or pass {key}=PATH{accepted}"
        )
    return run.product


# -- the summary a command ends with ------------------------------------------------------------
def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when under it, shell-quoted."""
    path = Path(path).resolve()
    try:
        text = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def summary(command: str, run_dir: Path, headline: str, next_command: str | None) -> str:
    """The few lines every command ends with: what it did, where it wrote, what to run next."""
    lines = [f"advpt {command}: {headline}", f"  run:  {shown(run_dir)}"]
    if next_command:
        lines.append(f"  next: {next_command}")
    return "\n".join(lines)


def number(metrics: Mapping[str, Any], key: str) -> float | None:
    """A finite float from a metrics mapping (tensors included), or None."""
    value = metrics.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None

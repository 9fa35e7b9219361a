"""Shared fixtures: tiny model / method configs read from conf/, so tests exercise the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

CONF = Path(__file__).resolve().parent.parent / "conf"


def load(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


@pytest.fixture
def micro() -> dict:
    return load("model", "vit_micro")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny models are overhead-bound: one thread is faster, and immune to a busy 2-core machine.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args: list[str]) -> int:
    """``advpt ARGS`` in-process; returns the exit code."""
    from advpt.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def make_method(name: str, attack: dict | None = None, num_classes: int = 10, **method_overrides):
    from advpt.methods import METHODS

    method = {**load("method", name), **method_overrides}
    return METHODS[name](
        model=load("model", "vit_micro"), method=method, attack=attack, num_classes=num_classes
    )


def one_line(err: str, command: str | None = None, *needles: str) -> None:
    """What every refusal promises: one line on stderr (``advpt COMMAND: error: …`` when ``command`` is
    given) that holds each of ``needles``."""
    assert err.count("\n") == 1, err
    if command is not None:
        assert err.startswith(f"advpt {command}: error: "), err
    for needle in needles:
        assert needle in err, err

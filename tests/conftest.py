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
def _seed() -> None:
    torch.manual_seed(0)


def make_method(name: str, attack: dict | None = None, num_classes: int = 10, **method_overrides):
    from advpt.methods import METHODS

    method = {**load("method", name), **method_overrides}
    return METHODS[name](
        model=load("model", "vit_micro"), method=method, attack=attack, num_classes=num_classes
    )

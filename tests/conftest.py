"""Shared fixtures: tiny model / method configs read from conf/, so tests exercise the shipped configs."""

from __future__ import annotations

import pytest
import torch
from helpers import load


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

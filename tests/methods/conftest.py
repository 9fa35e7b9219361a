"""Fixtures for the method tests: a spy on the PGD that the methods call."""

from __future__ import annotations

import pytest

import advpt.methods.base as base


@pytest.fixture
def record_pgd(monkeypatch):
    """Wrap the PGD the methods call, keeping its loss closure, input and output."""
    calls = []

    def spy(loss_fn, x, attack, **kwargs):
        delta = real(loss_fn, x, attack, **kwargs)
        calls.append({"loss_fn": loss_fn, "x": x, "delta": delta, **kwargs})
        return delta

    real = base.pgd
    monkeypatch.setattr(base, "pgd", spy)
    return calls

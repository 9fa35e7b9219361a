"""Pre-training methods, chosen by name from the ``method`` config group (the names: ``advpt.names``)."""

from __future__ import annotations

from advpt.methods.base import PretrainMethod
from advpt.methods.byol import BYOL
from advpt.methods.classify import RotNet, Supervised
from advpt.methods.mae import MAE

METHODS: dict[str, type[PretrainMethod]] = {
    "mae": MAE,
    "byol": BYOL,
    "rotnet": RotNet,
    "supervised": Supervised,
}

__all__ = ["METHODS", "MAE", "BYOL", "RotNet", "Supervised", "PretrainMethod"]

"""Pre-training methods, chosen by name from the ``method`` config group (the table: ``advpt.method_table``)."""

from __future__ import annotations

from advpt.method_table import METHOD_TABLE, method_class
from advpt.methods.base import PretrainMethod

METHODS: dict[str, type[PretrainMethod]] = {name: method_class(name) for name in METHOD_TABLE}

__all__ = ["METHODS", "PretrainMethod"]

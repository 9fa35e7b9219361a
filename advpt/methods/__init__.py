"""Pre-training methods, chosen by name from the ``method`` config group (the table: ``advpt.method_table``)."""

from __future__ import annotations

from advpt.method_table import METHOD_TABLE, Column, method_class
from advpt.methods.base import PretrainMethod

METHODS: Column[type[PretrainMethod]] = Column(method_class)
"""name -> its LightningModule, read from the table at each use (a method added to it later included)."""

for _name in METHOD_TABLE:  # the shipped methods load with the package (a study's fork server preloads it)
    method_class(_name)

__all__ = ["METHODS", "PretrainMethod"]

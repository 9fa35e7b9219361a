"""The names of the pre-training methods and attacks, and how the paper shows them.

The methods come from their table (``advpt.method_table``); the study's checks, the report's order and
labels read them from here, as live views of the table (read when used: an entry added to the table later
is seen). Nothing heavy is imported, so any module may import this one.
"""

from advpt.method_table import METHOD_TABLE, REPORT_ORDER, Column, Names

METHODS = Names()
"""The pre-training methods (``method=``), in the order messages list them (a tuple, read at each use)."""

NORMS = ("linf", "l2")
"""The norms an adversary's perturbation is bounded in (its radius ``eps`` is measured in them)."""

ATTACKS = ("none", *NORMS)
"""The pre-training attacks: none (nominal training), then one per norm."""

METHOD_LABEL = Column(lambda name: METHOD_TABLE[name].label, REPORT_ORDER)
"""How the paper names each method, in the order its figures and tables show them (read at each use)."""

ATTACK_LABEL = {"none": "nominal", "linf": "l_inf", "l2": "l2"}
"""How the paper names each attack."""


def arm_label(method: str, attack: str, radius: str) -> str:
    """A pre-training arm as the report's tables and figures name it: ``MAE l2 0.5``, ``BYOL nominal``."""
    label = f"{METHOD_LABEL.get(method, method)} {ATTACK_LABEL.get(attack, attack)}"
    return label if attack == "none" else f"{label} {radius}"

"""A method's own networks sized by the encoder they sit on.

A method's config lists its heads' sizes by encoder width (``method.decoder`` for MAE, ``method.heads``
for BYOL): the paper's at ViT-B's 768, smaller ones for the small models. The model files hold the encoder
alone, so a new method adds its sizes to its own config and no model file changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def sized_for(by_width: Mapping[Any, Mapping[str, Any]], width: int) -> dict[str, Any]:
    """The sizes listed for an encoder ``width`` wide: its own entry, else the widest one below it, else the
    narrowest one (``by_width``: encoder width -> sizes)."""
    widths = sorted(int(w) for w in by_width)
    if not widths:
        raise ValueError("no sizes are listed")
    below = [w for w in widths if w <= width]
    chosen = below[-1] if below else widths[0]
    entry = by_width.get(chosen, by_width.get(str(chosen)))
    return dict(entry)

"""Attack radii in the paper's units: what a radius at one image size is at 224 px.

An l2 radius is a norm over every pixel. The paper's radii are for 3 x 224 x 224 images; the same
perturbation per pixel on a side of s pixels has an l2 norm 224 / s times smaller (the norm grows with
the square root of the pixel count, and that count with the side squared). An l_inf radius bounds each
pixel alone, so it is the same at every size. Nothing is imported.
"""

from __future__ import annotations

PAPER_SIDE = 224
"""The image side the paper's radii are given at."""


def to_paper(norm: str, eps: float, side: int) -> float:
    """``eps`` at ``side`` px, in the paper's units (its equivalent at 224 px)."""
    return float(eps) * PAPER_SIDE / side if norm == "l2" else float(eps)


def from_paper(norm: str, eps: float, side: int) -> float:
    """A radius in the paper's units, at ``side`` px."""
    return float(eps) * side / PAPER_SIDE if norm == "l2" else float(eps)


def shown(norm: str, eps: float, side: int) -> str:
    """``0.0714 at 32 px (the paper's 0.5 at 224 px)``; an l_inf radius or a 224-px image is itself."""
    if norm != "l2" or side == PAPER_SIDE:
        return f"{eps:g}"
    return f"{eps:.3g} at {side} px (the paper's {to_paper(norm, eps, side):.3g} at {PAPER_SIDE} px)"

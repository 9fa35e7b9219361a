"""The pre-training methods of ``advpt``: name -> its LightningModule, how the report shows it, the views
and networks it trains, and how long its runs take.

The one list of methods: ``advpt.names``, ``advpt.methods``, the config checks, the views
(``advpt.data.transforms``), the study and the report read it. Torch-free and import-free, as
``advpt.commands`` is for commands: the command line checks a method's name before anything heavy loads.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Method(NamedTuple):
    module: str  # "package.module.Class": the LightningModule, imported only when a run builds it
    label: str  # how the paper's figures and tables name it
    colour: str  # its line in the report's figures (a matplotlib colour)
    order: int  # its place in the report's figures and tables (the paper's order)
    views: tuple[str, ...]  # the augmented views of each image it trains on (built by data/transforms.py)
    crop_scale: tuple[float, float]  # the views' crop scale where the config's views.crop_scale is unset
    networks: tuple[str, ...]  # what it trains beside the shared encoder (and what it keeps untrained)
    cost: float  # an adversarial run's length relative to the others (the study starts the longest first)


METHOD_TABLE: dict[str, Method] = {
    "mae": Method(
        "advpt.methods.mae.MAE",
        label="MAE",
        colour="tab:blue",
        order=2,
        views=("crop_flip",),
        crop_scale=(0.2, 1.0),
        networks=("decoder",),
        cost=1.0,
    ),
    "byol": Method(
        "advpt.methods.byol.BYOL",
        label="BYOL",
        colour="tab:orange",
        order=3,
        views=("byol_blur", "byol_solarize"),
        crop_scale=(0.08, 1.0),
        networks=("projector", "predictor", "EMA target (encoder + projector)"),
        cost=1.5,  # two networks (online and target) see every view
    ),
    "rotnet": Method(
        "advpt.methods.classify.RotNet",
        label="RotNet",
        colour="tab:green",
        order=1,
        views=("crop_flip_randaugment",),
        crop_scale=(0.08, 1.0),
        networks=("4-way rotation head", "weight EMA"),
        cost=1.0,
    ),
    "supervised": Method(
        "advpt.methods.classify.Supervised",
        label="Sup-PT",
        colour="tab:red",
        order=0,
        views=("crop_flip_randaugment",),
        crop_scale=(0.08, 1.0),
        networks=("class head", "weight EMA"),
        cost=1.0,
    ),
}
"""Every pre-training method (``method=NAME``, ``conf/method/NAME.yaml``), in the order messages list them."""

REPORT_ORDER: tuple[str, ...] = tuple(sorted(METHOD_TABLE, key=lambda name: METHOD_TABLE[name].order))
"""The methods in the order the report's figures and tables show them."""

SCRATCH = "scratch"
"""The baseline every method is compared with: fine-tuning from random weights. Not a method (nothing is
pre-trained), but the report and the study name it where they name methods."""
SCRATCH_LABEL = "scratch"
SCRATCH_COLOUR = "grey"  # Fig. 1's 0 line


def method_class(name: str) -> Any:
    """The LightningModule class of method ``name`` (imports its module, and so torch)."""
    import importlib

    module, _, cls = METHOD_TABLE[name].module.rpartition(".")
    return getattr(importlib.import_module(module), cls)

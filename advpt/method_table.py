"""The pre-training methods of ``advpt``: name -> its LightningModule, how the report shows it, the views
and networks it trains, and how long its runs take.

The one list of methods: ``advpt.names``, ``advpt.methods``, the config checks, the views
(``advpt.data.transforms``), the study and the report read it. Torch-free and import-free, as
``advpt.commands`` is for commands: the command line checks a method's name before anything heavy loads.
Every list derived from it (:data:`REPORT_ORDER`, ``names.METHODS``, ``names.METHOD_LABEL``, the classes
of ``advpt.methods.METHODS``, the report's colours) is a live view that reads the table when it is used,
never a copy made at import: an entry added later (a test's own method) is seen everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, overload

V = TypeVar("V")


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
    "dino": Method(
        "advpt.methods.dino.DINO",
        label="DINO",
        colour="tab:purple",
        order=4,
        # two global crops (BYOL's views, as DINO's DataAugmentationDINO) + views.counts.dino_local local crops
        views=("byol_blur", "byol_solarize", "dino_local"),
        crop_scale=(0.4, 1.0),  # the global crops' (main_dino.py); the local ones take (0.05, 0.4)
        networks=("DINO head", "EMA teacher (encoder + head)", "centre"),
        cost=1.7,  # BYOL's two attacked views and teacher pass, plus the clean local crops in the update
    ),
    "mocov3": Method(
        "advpt.methods.mocov3.MoCoV3",
        label="MoCo v3",
        colour="tab:brown",
        order=5,
        views=("byol_blur", "byol_solarize"),  # MoCo v3 takes BYOL's two asymmetric views (main_moco.py)
        crop_scale=(0.08, 1.0),
        networks=("projector", "predictor", "momentum encoder (encoder + projector)"),
        cost=1.5,  # two networks (online and momentum) see every view, as BYOL's
    ),
    "simclr": Method(
        "advpt.methods.simclr.SimCLR",
        label="SimCLR",
        colour="tab:pink",
        order=6,
        views=("simclr", "simclr"),
        crop_scale=(0.08, 1.0),
        networks=("projector",),
        cost=1.4,  # both views through one network, as BYOL's online one, with no target pass
    ),
}
"""Every pre-training method (``method=NAME``, ``conf/method/NAME.yaml``), in the order messages list them."""


class Names(Sequence[str]):
    """The table's names as a tuple read afresh at each use: in the table's order, or sorted by ``key``.
    Compares equal to the tuple it reads as."""

    def __init__(self, key: Callable[[str], Any] | None = None) -> None:
        self._key = key

    def now(self) -> tuple[str, ...]:
        """The names at this moment, as a plain tuple."""
        return tuple(METHOD_TABLE) if self._key is None else tuple(sorted(METHOD_TABLE, key=self._key))

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self.now()[index]

    def __len__(self) -> int:
        return len(METHOD_TABLE)

    def __iter__(self) -> Iterator[str]:
        return iter(self.now())

    def __contains__(self, name: object) -> bool:
        return name in METHOD_TABLE

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Names):
            other = other.now()
        return self.now() == other if isinstance(other, tuple) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # it changes with the table

    def __repr__(self) -> str:
        return repr(self.now())


class Column(Mapping[str, V]):
    """name -> ``value(name)`` for every method of the table, read at each use, in ``names``' order."""

    def __init__(self, value: Callable[[str], V], names: Sequence[str] | None = None) -> None:
        self._value = value
        self._names = names

    def __getitem__(self, name: str) -> V:
        if name not in METHOD_TABLE:
            raise KeyError(name)
        return self._value(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names if self._names is not None else tuple(METHOD_TABLE))

    def __len__(self) -> int:
        return len(METHOD_TABLE)

    def __repr__(self) -> str:
        return repr(dict(self))


REPORT_ORDER = Names(key=lambda name: METHOD_TABLE[name].order)
"""The methods in the order the report's figures and tables show them (a live view of the table)."""

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

"""What advpt trusts: the command line the user typed. Every file it opens is data.

A file could run code in two ways, and both are closed here: a pickle (``torch.load`` unpickles
arbitrary objects unless ``weights_only=True``), and a data location that names a program
(webdataset hands ``pipe:CMD`` to the shell, and its other URL schemes to curl, gsutil or ais).
Checkpoints are read with ``weights_only=True`` only; a data location read from a file
(``model.json``, ``info.json``) must be a local path. Nothing here imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from advpt.errors import UserError

SECURITY = "advpt runs no code from a file: see the README's Security section"


def load_checkpoint(path: Path, what: str) -> Any:
    """A torch file (``.ckpt``, ``.pth``) as data: tensors, numbers, strings and containers only.

    ``what`` is the setting that named the file (``resume=…``), for the one line on failure: a file
    that needs more than plain data to load is refused before any of it is built.
    """
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: an object that is not plain data
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f" (it needs the Python global {named.group(1)})" if named else ""
        raise UserError(
            f"{what}={path} holds Python objects beyond tensors and plain values{reason}; refused: {SECURITY}"
        ) from None
    except Exception as e:  # not a torch file, truncated, a folder, ...
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        hint = (
            "; a last.ckpt cut short by a crash or a full disk cannot be continued: start the run again "
            "(resume=null) or resume= an earlier copy"
            if what == "resume"
            else ""
        )
        raise UserError(
            f"{what}={path} is not a readable checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"
            + hint
        ) from None


def runs_program(location: str) -> bool:
    """Whether opening ``location`` through webdataset would start a program (any scheme but ``file:``).

    Parsed as webdataset parses it (``urlparse`` strips leading control characters and tabs).
    """
    return urlparse(location).scheme.lower() not in ("", "file")


# timm.create_model arguments that make it open or fetch weights itself: advpt loads weights itself,
# so a model description read from a file never names another file to load.
LOADING_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def refuse_loading_kwargs(kwargs: Mapping[str, Any], origin: str) -> None:
    """One line if a model description read from the file ``origin`` asks timm to load weights."""
    named = sorted(k for k in kwargs if k in LOADING_KWARGS)
    if named:
        raise UserError(
            f"{origin} asks timm to load weights itself ({named[0]}); a model description read from a file "
            f"may only describe the architecture: {SECURITY}"
        )


# The keys of a data config that name where data is read from.
LOCATION_KEYS = ("root", "info", "val")


def refuse_programs(
    data: Mapping[str, Any], origin: str, typed: tuple[str, ...] = (), hint: str = ""
) -> None:
    """One line if a data config read from the file ``origin`` names a program to run as a location.

    Such locations are accepted only as typed on the command line; ``typed`` lists the keys whose
    value the user gave there (they are not checked).
    """
    for key in LOCATION_KEYS:
        value = data.get(key)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if key not in typed and isinstance(v, str) and runs_program(v):
                raise UserError(
                    f"{origin} gives data.{key}={v!r}, a location that runs a program when opened; "
                    f"such locations are taken only from the command line{hint}: {SECURITY}"
                )

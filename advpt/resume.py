"""Resume state: what a run's ``checkpoints/last.ckpt`` says of its progress, ``resume=auto``, and
whether a run has anything left to do. Torch is imported only to read a checkpoint (as data)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from advpt.errors import UserError
from advpt.runs import PRODUCTS


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def read_progress(path: Path) -> dict[str, Any]:
    """What a ``last.ckpt`` records of its run's progress (steps, epochs); raises UserError if unreadable."""
    from advpt.trust import load_checkpoint

    ckpt = load_checkpoint(path, "resume")
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise UserError(f"resume={path} is not a Lightning training checkpoint (it has no training state)")
    progress = next((v for k, v in ckpt.get("callbacks", {}).items() if "LastCheckpoint" in k), {})
    return {"global_step": int(ckpt["global_step"]), "epochs_done": progress.get("epochs_done")}


def finished(progress: Mapping[str, Any], trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether a run that reached ``progress`` has nothing left to do under these Trainer limits."""
    max_steps = trainer_cfg.get("max_steps", -1)
    if max_steps is not None and int(max_steps) > 0:
        return progress["global_step"] >= int(max_steps)
    max_epochs = trainer_cfg.get("max_epochs")
    done = progress.get("epochs_done")
    return max_epochs is not None and int(max_epochs) >= 0 and done is not None and done >= int(max_epochs)


def resolve_resume(value: Any, run_dir: Path) -> str | None:
    """``resume=auto``: this run directory's ``last.ckpt`` if there is one, else a fresh start."""
    if value is None or str(value) != "auto":
        return None if value is None else str(value)
    path = last_checkpoint(run_dir)
    return str(path) if path.is_file() else None


def finished_message(run_dir: Path, trainer_cfg: Mapping[str, Any]) -> str | None:
    """``resume=auto`` on ``run_dir``: a message if it holds a run with nothing left to do, else None."""
    path = last_checkpoint(run_dir)
    if not path.is_file():
        return None
    if not any((run_dir / PRODUCTS[c]).is_file() for c in ("pretrain", "finetune")):
        return None  # stopped after its last checkpoint but before its export: resuming exports it
    progress = read_progress(path)
    if not finished(progress, trainer_cfg):
        return None
    return f"{run_dir} already finished at step {progress['global_step']}; nothing to do"

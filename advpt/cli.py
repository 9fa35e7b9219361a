"""``advpt <command> [overrides]``: picks the command's Hydra config, validates it, runs it."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

from advpt.errors import UserError

COMMANDS = {
    "pretrain": (
        "advpt.pretrain",
        "adversarial / nominal self-supervised pre-training (MAE, BYOL, RotNet, supervised)",
    ),
    "finetune": (
        "advpt.finetune",
        "fine-tune a pre-trained encoder (AdamW + layer-wise lr decay) or transfer it (optim=sgd_transfer)",
    ),
    "evaluate": (
        "advpt.evaluate",
        "clean, shifted and robust top-1 of a fine-tuned model (suite=auto|imagenet_variants); results.json",
    ),
    "visualize": (
        "advpt.visualize",
        "PCA of patch-embedding filters, one panel per checkpoint (paper Fig. 4); filters.png",
    ),
}

USAGE = "usage: advpt <command> [key=value ...] [-m] [--help] [--cfg job]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()
)

# Hydra flags that inspect rather than run: no validation needed for them.
_INSPECT_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--version",
}


def fail(message: str, command: str | None = None) -> None:
    prog = f"advpt {command}" if command else "advpt"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    if not any(a.split("=")[0] in _INSPECT_FLAGS for a in overrides):
        from advpt.config import validate

        plain = [a for a in overrides if not a.startswith("-")]
        try:
            validate(
                command,
                plain,
                multirun,
                check=getattr(importlib.import_module(COMMANDS[command][0]), "check", None),
            )
        except UserError as e:
            fail(str(e), command)
    _run_hydra(command, overrides)


def _run_hydra(command: str, overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from advpt.config import CONF_DIR

    job = importlib.import_module(COMMANDS[command][0])

    @hydra.main(config_path=str(CONF_DIR), config_name=command, version_base="1.3")
    def task(cfg: DictConfig) -> None:
        try:
            job.run(cfg)
        except UserError as e:
            # Leave nothing half-written: a run directory that never got a checkpoint is removed.
            out = Path(HydraConfig.get().runtime.output_dir)
            if out.is_dir() and not (out / "checkpoints").exists():
                shutil.rmtree(out, ignore_errors=True)
            fail(str(e), command)

    sys.argv = [f"advpt {command}", *overrides]
    task()


if __name__ == "__main__":
    main()

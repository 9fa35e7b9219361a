"""``advpt <command> [overrides]``: picks the command's Hydra config, validates it, runs it."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

from advpt.commands import COMMANDS, KEEPS_FOLDER
from advpt.config import register_resolvers
from advpt.errors import DiskFull, UserError
from advpt.lock import hold, release
from advpt.quiet import silence_noise

# At import: jobs that a launcher runs in another process (submitit) resolve the configs there too.
register_resolvers()

USAGE = "usage: advpt <command> [key=value ...] [-m] [--help] [--cfg job]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {c.help}" for name, c in COMMANDS.items()
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


def fail(message: str, command: str | None = None, code: int = 2) -> None:
    prog = f"advpt {command}" if command else "advpt"
    _close_progress_bars()
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _close_progress_bars() -> None:
    """Close a progress bar that a failed run left open now, so its last redraw (tqdm repaints it when it
    is closed, at exit otherwise) comes before the error line rather than after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    silence_noise()
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    if any(a in ("--help", "-h") for a in overrides):
        _print_help(command, [a for a in overrides if not a.startswith("-")])
        sys.exit(0)
    if not any(a.split("=")[0] in _INSPECT_FLAGS for a in overrides):
        from advpt.config import validate

        plain = [a for a in overrides if not a.startswith("-")]
        try:
            # Cheap checks of every job first; the command's module (torch, Lightning, timm) after them.
            validate(command, plain, multirun, module=COMMANDS[command].module)
        except UserError as e:
            fail(str(e), command)
        if not multirun:
            from advpt.config import compose

            try:
                cfg = compose(command, plain, hydra=True)
                run_dir = Path(str(cfg.hydra.run.dir))
            except Exception as e:  # a hydra.* override that does not resolve
                from advpt.config import describe_hydra_error

                fail(describe_hydra_error(e, command), command)
            if any(a.startswith("resume=auto") for a in plain):
                from advpt.resume import finished_message

                try:
                    message = finished_message(run_dir, cfg.trainer)
                except UserError as e:  # an unreadable or refused last.ckpt in the run directory
                    fail(str(e), command)
                if message:  # checked before Hydra writes into the run directory
                    print(f"advpt {command}: {message}")
                    sys.exit(0)
            # The folder is this run's before Hydra writes into it; Hydra is given the same folder (a
            # default one is named by the time, which the second composition could read a second later).
            if not any(a.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for a in plain):
                overrides = [*overrides, f"hydra.run.dir={_hydra_value(str(run_dir))}"]
            _hold(run_dir, command, plain)
            try:
                _run_hydra(command, overrides)
            finally:
                release(run_dir)
            return
    _run_hydra(command, overrides)


def _hold(run_dir: Path, command: str, overrides: list[str]) -> None:
    """Take ``run_dir`` for this run, or end the command with one line naming the run that has it."""
    try:
        hold(run_dir, command, overrides)
    except DiskFull as e:
        fail(str(_after_disk_fault(e, command, overrides, run_dir)), command, e.exit_code)
    except UserError as e:
        fail(str(e), command, getattr(e, "exit_code", 2))


def _hydra_value(text: str) -> str:
    """``text`` as one value of Hydra's override grammar: as is when plain, else quoted."""
    import re

    if re.fullmatch(r"[\w./:+@%-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _print_help(command: str, overrides: list[str]) -> None:
    """``advpt COMMAND --help``: conf/hydra/help/advpt.yaml's template, filled as Hydra fills it, without
    Hydra's listing of every group in the config folder (which also takes seconds)."""
    from string import Template

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from advpt.config import compose, describe_hydra_error

    try:
        cfg = compose(command, overrides, hydra=True)
    except Exception as e:
        fail(describe_hydra_error(e, command), command)
    HydraConfig.instance().set_config(cfg)
    template = str(cfg.hydra.help.template)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        print(Template(template).safe_substitute(CONFIG=OmegaConf.to_yaml(cfg)), flush=True)
    except BrokenPipeError:  # `advpt pretrain --help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run_hydra(command: str, overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from advpt.config import CONF_DIR
    from advpt.launch import PREEMPTED_EXIT, Preempted

    @hydra.main(config_path=str(CONF_DIR), config_name=command, version_base="1.3")
    def task(cfg: DictConfig) -> None:
        out = Path(HydraConfig.get().runtime.output_dir)
        _hold(out, command, overrides)  # a sweep's job (a single run holds its folder already)
        try:
            # Imported here, not before: --help and --cfg never need torch, Lightning or timm.
            job = importlib.import_module(COMMANDS[command].module)
            job.run(cfg)
        except (UserError, OSError) as e:
            error = _user_error(e, out)
            if error is None:
                raise
            # Leave nothing half-written: a run directory that never got a checkpoint is removed
            # (a study's folder holds other runs: it stays).
            if command not in KEEPS_FOLDER and out.is_dir() and not (out / "checkpoints").exists():
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(error, DiskFull):
                error = _after_disk_fault(error, command, overrides, out)
            fail(str(error), command, getattr(error, "exit_code", 2))
        except Preempted as e:
            again = " ".join([f"advpt {command}", *_plain(overrides, drop=("resume", "hydra.run.dir"))])
            print(
                f"advpt {command}: {e}. Continue with: {again} resume=auto hydra.run.dir={out}",
                file=sys.stderr,
            )
            sys.exit(PREEMPTED_EXIT)
        finally:
            release(out)

    # Hydra reads the overrides from sys.argv; argv[0] stays the real program (workers never re-run it).
    sys.argv = [sys.argv[0], *overrides]
    task()


def _user_error(error: BaseException, out: Path) -> UserError | None:
    """``error`` as the one line it is for the user: a UserError as is, a write that its disk refused
    (full, over quota, read-only) as :class:`DiskFull`; None for anything else."""
    if isinstance(error, UserError):
        return error
    from advpt.files import disk_fault, disk_full

    fault = disk_fault(error)
    if fault is None:
        return None
    path = getattr(error, "filename2", None) or getattr(error, "filename", None) or out
    return disk_full(path, fault)


def _after_disk_fault(error: DiskFull, command: str, overrides: list[str], out: Path) -> DiskFull:
    """``error`` with what to do next: make room (or write elsewhere), then run again, or continue from
    the run's last.ckpt where it has one."""
    remedy = "write elsewhere" if error.read_only else "free some space"
    last = out / "checkpoints" / "last.ckpt"
    if error.read_only or not last.is_file():
        return DiskFull(f"{error}; {remedy} and run it again", error.read_only)
    again = " ".join([f"advpt {command}", *_plain(overrides, drop=("resume", "hydra.run.dir"))])
    return DiskFull(
        f"{error}; checkpoints/last.ckpt keeps the last saved step: {remedy}, then continue with: "
        f"{again} resume=auto hydra.run.dir={out}"
    )


def _plain(overrides: list[str], drop: tuple[str, ...]) -> list[str]:
    """The command line's overrides without the keys in ``drop`` (quoted for a shell where needed)."""
    import shlex

    return [shlex.quote(a) for a in overrides if a.split("=", 1)[0].lstrip("+~") not in drop]


if __name__ == "__main__":
    main()

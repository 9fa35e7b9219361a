"""Where the configs live, composing them as Hydra does, rewording Hydra's errors, and the resolvers
the configs use (``${run_stamp:}``, ``${safe_dirname:}``, ``${command_groups:}``)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_PACKAGED = Path(__file__).resolve().parent.parent / "conf"
_REPO = Path(__file__).resolve().parent.parent.parent / "conf"
CONF_DIR = _PACKAGED if _PACKAGED.is_dir() else _REPO


def compose(command: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """The config of ``advpt COMMAND OVERRIDES`` (with the ``hydra`` node if asked)."""
    return compose_all(command, [overrides], hydra)[0]


def compose_all(command: str, jobs: Sequence[list[str]], hydra: bool = False) -> list[DictConfig]:
    """The configs of several override lists of one command, composed in one Hydra context."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
        return [hydra_compose(command, overrides=list(job), return_hydra_config=hydra) for job in jobs]


def describe_hydra_error(e: BaseException, command: str) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        options = ", ".join(sorted(e.options or [])) if e.options else None
        if group and options:
            return f"unknown {group} option {name!r}; choose one of: {options}"
        return str(e).splitlines()[0]
    cause = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    key = None
    if "Key '" in str(cause):
        key = str(cause).split("Key '", 1)[1].split("'", 1)[0]
    if text.startswith("Could not override") or text.startswith("Could not append") or key:
        name = text.split("'", 2)[1] if "'" in text else key
        full = re.search(r"full_key: (\S+)", str(cause))
        if name and full and full.group(1).startswith(f"{name}."):
            # a mapping given whole (key={a:1,b:2}) with a key the config's mapping lacks
            new = full.group(1)
            return (
                f"{name} has no key {new[len(name) + 1 :]!r}: add it with +{new}=VALUE "
                f"(list the accepted keys with `advpt {command} --cfg job`)"
            )
        return (
            f"unknown key {name!r}: it is not in the {command} config "
            f"(list the accepted keys with `advpt {command} --cfg job`; new Trainer arguments as +trainer.NAME=VALUE)"
        )
    if text.startswith("Ambiguous value for argument"):
        arg = text.split("'", 2)[1]
        return f"{arg!r} lists several values: add -m (--multirun) to run one job per value"
    first = text.split(". ")[0] if text else type(e).__name__
    return first.replace("\n", " ")


# -- resolvers of the command configs (registered when advpt.cli is imported) -------------------
def safe_dirname(overrides: Any) -> str:
    """Hydra's ``override_dirname`` (``method-mae+eps-4/255``) as one folder name that is also a plain
    Hydra value, so ``pretrained=<that folder>`` can be typed as is: ``/`` and anything else Hydra's
    override grammar or a shell would read (``=``, ``,``, quotes, brackets, spaces) becomes ``_``;
    names are cut at 200 characters (the job number before them keeps them apart)."""
    return re.sub(r"[^A-Za-z0-9_.+\-@:%]", "_", str(overrides))[:200]


def command_groups() -> str:
    """The config groups the running command composes, each with its options (``--help``; "" if none)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    lines = []
    for group, chosen in sorted(choices.items()):
        # Hydra's own groups, and recipe/<command>, which recipe= picks, are not typed by users.
        if group.startswith("hydra/") or "/" in group or "@" in group:
            continue
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        listed = ", ".join(f"{o}*" if o == chosen else o for o in options)
        note = "  (default: read from the encoder)" if chosen is None else ""
        lines.append(f"{group}: {listed}{note}")
    if not lines:
        return ""
    if "model" in choices:
        lines.append("(model.name in the config is the timm architecture that the model option builds)")
    return "\n".join(["", "== Groups: group=option (* = current choice) ==", *lines, ""])


def run_stamp(pattern: str) -> str:
    """The time stamp in a run directory's name, the same in every process of one launch.

    An external launcher (srun with several tasks, torchrun) starts every process with the whole
    command line, and their clocks can straddle a second; the launch's own id names the run instead
    (a requeued SLURM job keeps its id, so ``resume=auto`` finds the run again).
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime(pattern)


def register_resolvers() -> None:
    """The resolvers the configs use; every process that composes a config registers them."""
    OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
    OmegaConf.register_new_resolver("command_groups", command_groups, replace=True)
    # Cached like Hydra's ${now:}: one value per process, however often the path is resolved.
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)

"""The ``study`` command: a whole grid of the paper (pre-training, fine-tuning, evaluation, transfer) and
its report, resumable and idempotent.

An experiment (``conf/experiment/<name>.yaml``) names the arms: methods x attacks x radii x seeds, a
from-scratch baseline, the layer decays every pre-trained model is fine-tuned with, and the transfer
datasets and optimisers of Table 1. Each run has a fixed folder under the study's directory, named by
what it computes::

    <study>/pretrain/<method>-<attack>-<eps>-s<seed>
    <study>/finetune/<pretrain arm | scratch-s<seed>>-<data>-<optim>-ld<decay>
    <study>/evaluate/<finetune arm>[-clean]

so a finished run (its product is there, :mod:`advpt.runs`) is skipped without starting a process,
a half-finished one continues from its ``last.ckpt`` (``resume=auto``), and a rerun after a crash or
a pre-emption costs only what is left. Runs are ``advpt`` commands in child processes, one after
another, with their output in ``<study>/logs/``; ``launcher=NAME`` hands each stage's pending runs to
that Hydra launcher instead (``hydra/launcher=NAME``: ``slurm``, ``submitit_local``, ...), one sweep
per stage. Transfer (Table 1) starts from the best radius of each method x attack on the evaluated
average, so it is planned once the evaluations are in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from advpt.errors import UserError
from advpt.report.collect import radius_value
from advpt.runs import PRODUCTS, is_finished, shown

STAGES = ("pretrain", "finetune", "evaluate", "transfer", "transfer-evaluate")
METHODS = ("mae", "byol", "rotnet", "supervised")
ATTACKS = ("none", "linf", "l2")


@dataclass
class Job:
    """One ``advpt`` run of the study: its command, folder and overrides, and the job it needs first."""

    stage: str
    command: str
    name: str
    directory: Path
    overrides: list[str]
    needs: Job | None = None
    resumable: bool = True
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def product(self) -> Path:
        return self.directory / PRODUCTS[self.command]

    @property
    def finished(self) -> bool:
        """Its product is there, and newer than the product of the job it started from (a model that
        was trained again is evaluated again)."""
        if not is_finished(self.directory, self.command):
            return False
        if self.needs is None or not self.needs.finished:
            return self.needs is None
        return self.product.stat().st_mtime >= self.needs.product.stat().st_mtime

    def argv(self) -> list[str]:
        extra = ["resume=auto"] if self.resumable else []
        return [self.command, *self.overrides, *extra, f"hydra.run.dir={self.directory}"]


def radius_name(eps: Any) -> str:
    """A radius as part of a folder name: ``4/255`` -> ``4_255``, ``0.5`` -> ``0.5``."""
    return str(eps).replace("/", "_").replace(" ", "")


def _strings(values: Any) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, Sequence | ListConfig) or isinstance(values, str):
        raise UserError(f"expected a list of overrides, got {values!r}")
    return [str(v) for v in values]


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, ListConfig | list | tuple):
        return list(value)
    return [value]


# -- the plan ------------------------------------------------------------------------------------
def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """The experiment names known methods, attacks, radii and at least one pre-training arm."""
    from advpt.config import parse_number

    exp = cfg.experiment
    seeds = cfg.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"seeds={seeds} is invalid: expected a whole number >= 1 (runs per arm)")
    for method, attack, eps in arms(cfg):
        if method not in METHODS:
            raise UserError(
                f"experiment {exp.name}: unknown method {method!r}; choose from {', '.join(METHODS)}"
            )
        if attack not in ATTACKS:
            raise UserError(
                f"experiment {exp.name}: unknown attack {attack!r}; choose from {', '.join(ATTACKS)}"
            )
        if parse_number(eps, f"experiment {exp.name}: radius") < 0:
            raise UserError(f"experiment {exp.name}: radius {eps} of {method} {attack} is negative")
    if not arms(cfg):
        raise UserError(
            f"experiment {exp.name} has no pre-training arm (pretrain.methods x attacks, or arms)"
        )
    if not _list(exp.finetune.layer_decays):
        raise UserError("experiment.finetune.layer_decays is empty: give at least one layer decay")
    for key in ("data_root", "variants_root", "transfer_root"):
        needed = exp.get(f"needs_{key}", False)
        if needed and not cfg.get(key):
            raise UserError(f"experiment={exp.name} runs on external data: pass {key}=PATH")
        if cfg.get(key) and not Path(str(cfg[key])).expanduser().is_dir():
            raise UserError(f"{key}={cfg[key]} does not exist or is not a folder")
    return cfg


def arms(cfg: DictConfig) -> list[tuple[str, str, Any]]:
    """(method, attack, eps) of every pre-training arm: the grid methods x attacks x radii, then the
    experiment's explicit ``pretrain.arms`` (grids that are not a product, as Fig. 3 and Table 1)."""
    exp = cfg.experiment
    found: list[tuple[str, str, Any]] = []
    for method in _list(exp.pretrain.methods):
        for attack, radii in (exp.pretrain.attacks or {}).items():
            for eps in _list(radii) if attack != "none" else [0]:
                found.append((method, attack, eps))
    for arm in _list(exp.pretrain.get("arms")):
        found.append((arm["method"], arm["attack"], arm.get("eps", 0) if arm["attack"] != "none" else 0))
    return list(dict.fromkeys(found))


def pretrain_jobs(cfg: DictConfig, root: Path) -> list[Job]:
    exp = cfg.experiment
    common = [*([f"model={exp.model}"] if exp.get("model") else []), *_strings(exp.pretrain.overrides)]
    if exp.get("needs_data_root") and cfg.get("data_root"):
        common.append(f"data.root={cfg.data_root}")
    jobs = []
    for seed in range(int(cfg.seeds)):
        for method, attack, eps in arms(cfg):
            arm = f"{method}-none" if attack == "none" else f"{method}-{attack}-{radius_name(eps)}"
            name = f"{arm}-s{seed}"
            radius = [] if attack == "none" else [f"eps={eps}"]
            jobs.append(
                Job(
                    "pretrain",
                    "pretrain",
                    name,
                    root / "pretrain" / name,
                    [f"method={method}", f"attack={attack}", *radius, f"seed={seed}", *common],
                    labels={"method": method, "attack": attack, "eps": eps, "seed": seed},
                )
            )
    return jobs


def finetune_job(
    cfg: DictConfig,
    root: Path,
    source: Job | None,
    seed: int,
    data: str,
    optim: str,
    layer_decay: Any,
    stage: str = "finetune",
) -> Job:
    """Fine-tuning of ``source`` (``None``: from scratch) on ``data`` with ``optim`` at ``layer_decay``."""
    exp = cfg.experiment
    base = source.name if source is not None else f"scratch-s{seed}"
    name = f"{base}-{data}-{optim}-ld{layer_decay}"
    if source is None:
        origin = ["pretrained=none", *([f"model={exp.model}"] if exp.get("model") else [])]
    else:
        origin = [f"pretrained={source.directory}"]
    extra = _strings(exp.finetune.overrides) if data == exp.finetune.data else []
    transfer = exp.get("transfer") or {}
    if stage == "transfer":
        extra = _strings(transfer.get("overrides"))
    if source is None:  # the scratch model's own settings come last: they win
        extra += _strings(exp.scratch.get("overrides"))
    data_args = [f"data={data}"]
    if cfg.get("data_root") and data == exp.finetune.data and exp.get("needs_data_root", False):
        data_args.append(f"data.root={cfg.data_root}")
    elif cfg.get("transfer_root") and data != exp.finetune.data:
        data_args.append(f"data.root={cfg.transfer_root}")
    labels = dict(source.labels) if source is not None else {"method": "scratch", "attack": "none", "eps": 0}
    labels.update(seed=seed, data=data, optim=optim, layer_decay=layer_decay)
    return Job(
        stage,
        "finetune",
        name,
        root / "finetune" / name,
        [*origin, *data_args, f"optim={optim}", f"layer_decay={layer_decay}", f"seed={seed}", *extra],
        needs=source,
        labels=labels,
    )


def finetune_jobs(cfg: DictConfig, root: Path, pretrained: list[Job]) -> list[Job]:
    exp = cfg.experiment
    data, optim = exp.finetune.data, exp.finetune.optim
    jobs = [
        finetune_job(cfg, root, source, source.labels["seed"], data, optim, decay)
        for source in pretrained
        for decay in _list(exp.finetune.layer_decays)
    ]
    if exp.scratch.get("enabled", True):
        decay = exp.scratch.get("layer_decay", 1.0)
        jobs += [finetune_job(cfg, root, None, seed, data, optim, decay) for seed in range(int(cfg.seeds))]
    return jobs


def evaluate_job(cfg: DictConfig, root: Path, finetuned: Job, overrides: list[str], suffix: str = "") -> Job:
    stage = "transfer-evaluate" if finetuned.stage == "transfer" else "evaluate"
    name = finetuned.name + suffix
    extra = []
    if cfg.get("variants_root") and "suite=imagenet_variants" in overrides:
        extra.append(f"root={cfg.variants_root}")
    return Job(
        stage,
        "evaluate",
        name,
        root / "evaluate" / name,
        [f"checkpoint={finetuned.directory}", *overrides, *extra],
        needs=finetuned,
        resumable=False,
        labels=dict(finetuned.labels),
    )


def transfer_jobs(
    cfg: DictConfig, root: Path, pretrained: list[Job], best: Mapping[tuple[str, str], Any]
) -> list[Job]:
    """Table 1: the best radius of each method x attack (``best``: (method, attack) -> eps), transferred
    to every dataset with every optimiser. A run that fine-tuning already made is the same folder."""
    transfer = cfg.experiment.get("transfer") or {}
    if not transfer or not _list(transfer.get("datasets")):
        return []
    jobs = []
    for source in pretrained:
        key = (source.labels["method"], source.labels["attack"])
        if key not in best or abs(radius_value(best[key]) - radius_value(source.labels["eps"])) > 1e-9:
            continue
        for data in _list(transfer.datasets):
            for optim in _list(transfer.optims):
                decay = transfer.get("layer_decay", 1.0) if optim == "adamw_lld" else 1.0
                job = finetune_job(cfg, root, source, source.labels["seed"], data, optim, decay, "transfer")
                jobs.append(job)
    return jobs


# -- running -------------------------------------------------------------------------------------
class Runner:
    """Runs jobs one after another in child processes (or as one Hydra sweep per stage), skipping
    finished ones, and prints one progress line per run."""

    def __init__(self, root: Path, launcher: str | None, dry_run: bool = False) -> None:
        self.root = root
        self.launcher = launcher
        self.dry_run = dry_run
        self.failed: list[Job] = []
        self._child: subprocess.Popen[bytes] | None = None

    def say(self, text: str) -> None:
        print(f"advpt study: {text}", flush=True)

    def stage(self, name: str, jobs: list[Job]) -> None:
        if not jobs:
            return
        pending = [j for j in jobs if not j.finished]
        blocked = [j for j in pending if j.needs is not None and not j.needs.finished]
        ready = [j for j in pending if j not in blocked]
        done = len(jobs) - len(pending)
        first = f"{name} {done}/{len(jobs)} done"
        first += f", {len(ready)} to run" if ready else ""
        if blocked:
            first += f", {len(blocked)} waiting on " + ("earlier stages" if self.dry_run else "a failed run")
        self.say(first)
        if self.dry_run:
            for job in ready:
                self.say(f"  would run: advpt {' '.join(job.argv())}")
            return
        for job in ready:
            if is_finished(job.directory, job.command):  # finished before the run it starts from: stale
                stale = job.directory.with_name(
                    f"{job.directory.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
                )
                job.directory.rename(stale)
                self.say(f"{name} {job.name}: older than the run it starts from; moved to {shown(stale)}")
        if self.launcher and ready:
            self._sweep(name, ready)
            done += sum(j.finished for j in ready)
            self.failed += [j for j in ready if not j.finished]
            self.say(f"{name} {done}/{len(jobs)} done")
            return
        for job in ready:
            started = time.monotonic()
            code = self._run(job)
            took = _duration(time.monotonic() - started)
            if code == 0 and job.finished:
                done += 1
                self.say(f"{name} {done}/{len(jobs)} done ({job.name}, {took})")
            else:
                self.failed.append(job)
                self.say(f"{name} {job.name} failed (exit {code}, {took}); log: {shown(self._log(job))}")

    def _log(self, job: Job) -> Path:
        return self.root / "logs" / job.stage / f"{job.name}.log"

    def _run(self, job: Job) -> int:
        log = self._log(job)
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "advpt.cli", *job.argv()]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            out.write(f"$ advpt {' '.join(job.argv())}\n".encode())
            out.flush()
            self._child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                code = self._child.wait()
            finally:
                self._child = None
        if code == 143:  # the run was pre-empted: so is the study
            raise Interrupted(f"{job.stage} {job.name} was stopped")
        return code

    def _sweep(self, name: str, jobs: list[Job]) -> None:
        """Hand ``jobs`` (one command) to a Hydra launcher as one sweep: each job is an entry of a
        config group written under ``<study>/.arms/<stage>`` that sets its overrides and folder."""
        arms = self.root / ".arms" / name
        group = arms / "study_arm"
        group.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            text = "# @package _global_\n" + _as_yaml(job)
            (group / f"{job.name}.yaml").write_text(text)
        command = jobs[0].command
        argv = [
            sys.executable,
            "-m",
            "advpt.cli",
            command,
            "-m",
            f"+study_arm={','.join(j.name for j in jobs)}",
            f"hydra.searchpath=[file://{arms}]",
            f"hydra/launcher={self.launcher}",
            f"hydra.sweep.dir={self.root / command}",
            "hydra.sweep.subdir=${hydra:runtime.choices.study_arm}",
        ]
        log = self.root / "logs" / f"{name}.sweep.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)

    def interrupt(self, signum: int) -> None:
        """Pass the signal on to the running job and give it time to save its ``last.ckpt``."""
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)
            try:
                child.wait(timeout=300)
            except subprocess.TimeoutExpired:
                child.kill()


def _as_yaml(job: Job) -> str:
    """A job's overrides as a ``_global_`` config: groups in a defaults list, values as keys."""
    from advpt.config import CONF_DIR

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    defaults, values = [], {}
    for item in [*job.overrides, *(["resume=auto"] if job.resumable else [])]:
        key, _, value = item.partition("=")
        if key in groups:
            defaults.append(f"  - override /{key}: {value}")
        else:
            values[key] = value
    body = ("defaults:\n" + "\n".join(defaults) + "\n") if defaults else ""
    conf = OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()])
    return body + OmegaConf.to_yaml(conf)


class Interrupted(Exception):
    """The study was stopped (a signal, or a pre-empted run); rerunning it continues."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def best_radii(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    """(method, attack) -> the radius whose fine-tuned models average best (mean over seeds and layer
    decays is not taken: each radius counts with its best layer decay, as Fig. 1 does)."""
    from advpt.report.aggregate import best_by_arm

    return best_by_arm(rows)


def run_study(cfg: DictConfig, root: Path) -> int:
    """Plan, run and report the study in ``root``; the exit code (0: every run finished)."""
    check(cfg)
    exp = cfg.experiment
    runner = Runner(root, cfg.get("launcher"), bool(cfg.get("dry_run", False)))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def forward(signum: int, _frame: Any) -> None:
        runner.interrupt(signal.SIGTERM if signum == signal.SIGUSR1 else signum)
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    for s in previous:
        signal.signal(s, forward)
    started = time.monotonic()
    try:
        pretrained = pretrain_jobs(cfg, root)
        runner.stage("pretrain", pretrained)
        finetuned = finetune_jobs(cfg, root, pretrained)
        runner.stage("finetune", finetuned)
        overrides = _strings(exp.evaluate.overrides)
        evaluated = [evaluate_job(cfg, root, j, overrides) for j in finetuned]
        runner.stage("evaluate", evaluated)
        transfer = exp.get("transfer") or {}
        if transfer and _list(transfer.get("datasets")) and not runner.dry_run:
            from advpt.report.collect import collect

            best = best_radii(collect([root / "evaluate"]))
            moved = transfer_jobs(cfg, root, pretrained, best)
            runner.stage(
                "transfer", [j for j in moved if j.directory not in {f.directory for f in finetuned}]
            )
            clean = _strings(transfer.get("evaluate"))
            # A transferred model that the evaluate stage already scored (same folder) is not scored again.
            scored = {j.needs.directory for j in evaluated if j.needs is not None}
            checks = [evaluate_job(cfg, root, j, clean, "-clean") for j in moved if j.directory not in scored]
            runner.stage("transfer-evaluate", checks)
    except Interrupted as e:
        runner.say(f"stopped ({e}); rerun the same command to continue")
        return 143
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if runner.dry_run:
        return 0
    if cfg.get("report", True):
        from advpt.report import build_report

        out = root / "report"
        written = build_report([root], out, paper=True, note=runner.say)
        runner.say(f"report: {len(written)} files in {shown(out)}")
    runner.say(f"{len(runner.failed)} runs failed; took {_duration(time.monotonic() - started)}")
    for job in runner.failed:
        runner.say(f"  failed: {job.stage} {job.name} (log: {shown(runner._log(job))})")
    return 1 if runner.failed else 0


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    root = Path(HydraConfig.get().runtime.output_dir).resolve()
    code = run_study(cfg, root)
    if code:
        sys.exit(code)

"""Running a study's jobs: one after another in child processes, or as one Hydra sweep per stage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from advpt.runs import is_finished, shown
from advpt.study.plan import Job


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

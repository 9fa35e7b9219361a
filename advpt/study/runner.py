"""Running a study's jobs: in child processes, ``workers`` at a time, or as one Hydra sweep per stage.

A study starts hundreds of short runs, and each ``python -m advpt.cli`` pays seconds of imports (torch,
Lightning, timm) before its first step. So a job is a process forked from a server that imported them
once (:mod:`multiprocessing`'s ``forkserver`` with those modules preloaded): a fresh process per run,
as isolated as a new interpreter (its own Hydra state, seeds and signal handlers), that starts in
milliseconds.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from advpt.method_table import METHOD_TABLE, SCRATCH
from advpt.runs import is_finished, shown
from advpt.study.plan import Job


class Runner:
    """Runs jobs one after another in child processes (or as one Hydra sweep per stage), skipping
    finished ones, and prints one progress line per run."""

    def __init__(self, root: Path, launcher: str | None, dry_run: bool = False, workers: int = 1) -> None:
        self.root = root
        self.launcher = launcher
        self.dry_run = dry_run
        self.workers = workers
        self.failed: list[Job] = []
        self.busy = 0.0  # seconds of runs, added over the runs (workers side by side count each)
        self._children: set[multiprocessing.process.BaseProcess] = set()

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
        # the longest first, so that no worker is left with a long run at the end of the stage
        ready.sort(key=_expected_cost, reverse=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            queue, running = list(ready), {}
            while queue or running:
                while queue and len(running) < self.workers:
                    job = queue.pop(0)
                    running[pool.submit(self._run, job)] = (job, time.monotonic())
                # a timeout, so that a signal reaches the study's handler within a second
                finished, _ = concurrent.futures.wait(
                    running, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    job, started = running.pop(future)
                    code = future.result()
                    self.busy += time.monotonic() - started
                    took = _duration(time.monotonic() - started)
                    if code == 0 and job.finished:
                        done += 1
                        self.say(f"{name} {done}/{len(jobs)} done ({job.name}, {took})")
                    else:
                        self.failed.append(job)
                        self.say(
                            f"{name} {job.name} failed (exit {code}, {took}); log: {shown(self._log(job))}"
                        )

    def _log(self, job: Job) -> Path:
        return self.root / "logs" / job.stage / f"{job.name}.log"

    def _run(self, job: Job) -> int:
        """Run ``job`` in a process forked from the preloaded server; its exit code."""
        log = self._log(job)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"$ advpt {' '.join(job.argv())}\n".encode())
        child = _context(self.workers).Process(
            target=_job, args=(job.argv(), str(log), os.getpid()), name=job.name
        )
        # Every read of a child's exit status (start() reaps finished children too) holds the lock:
        # two threads reading one child's status pipe would leave one of them without it.
        with _STATUS:
            child.start()
            self._children.add(child)
        try:
            multiprocessing.connection.wait([child.sentinel])
            with _STATUS:
                child.join()
        finally:
            self._children.discard(child)
        code = child.exitcode if child.exitcode is not None else 1
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
        """Pass the signal on to the running jobs and give them time to save their ``last.ckpt``."""
        with _STATUS:
            children = [c for c in list(self._children) if c.exitcode is None]
        for child in children:
            if child.pid is not None:
                os.kill(child.pid, signum)
        deadline, waiting = time.monotonic() + 300, {c.sentinel for c in children}
        while waiting and time.monotonic() < deadline:
            waiting -= set(multiprocessing.connection.wait(list(waiting), deadline - time.monotonic()))
        with _STATUS:
            for child in children:
                if child.exitcode is None:
                    child.kill()


# What every job imports: loaded once into the server the jobs are forked from.
_PRELOAD = ["torch", "lightning", "timm", "advpt.cli", "advpt.pretrain", "advpt.finetune", "advpt.evaluate"]
_CONTEXT: multiprocessing.context.BaseContext | None = None
_STATUS = threading.Lock()


def _context(workers: int) -> multiprocessing.context.BaseContext:
    """The fork server, started on the first job. Jobs run side by side share the cores: unless
    ``OMP_NUM_THREADS`` says otherwise, each gets ``cores // workers`` threads."""
    global _CONTEXT
    if _CONTEXT is None:
        if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def _stop_with_the_study(study: int) -> None:
    """End this job as SIGTERM would (it saves its last.ckpt and exits) when the study process ``study``
    ends, even by SIGKILL, so that the study run again continues the run instead of finding it still
    running in its folder. A job's parent is the fork server, which outlives the study while jobs
    remain, so the job watches the study itself: a Linux pidfd, readable once the process has ended.
    Elsewhere a job outlives a killed study."""
    import select
    import signal
    import threading

    try:
        handle = os.pidfd_open(study)
    except ProcessLookupError:  # the study ended before this job began
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except (AttributeError, OSError):  # no pidfd here
        return

    def watch() -> None:
        select.select([handle], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="study-watch", daemon=True).start()


def _job(argv: list[str], log: str, study: int) -> None:
    """A job's process: ``advpt ARGV`` with its output appended to ``log``; exits with its code."""
    _stop_with_the_study(study)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.argv = ["advpt", *argv]
    code: object = 0
    try:
        from advpt.cli import main

        main(argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):  # sys.exit("message"): the interpreter prints it and exits 1
            print(code, file=sys.stderr)
    except BaseException:  # a crash: its traceback in the log, as the interpreter would print it
        import traceback

        traceback.print_exc()
        code = 1
    # multiprocessing ends the process with this code, after its finalizers (semaphores released)
    sys.exit(code if isinstance(code, int) else (0 if code is None else 1))


def _expected_cost(job: Job) -> float:
    """A rough rank of a job's length within its stage: adversarial before nominal pre-training (the
    methods with the largest ``cost`` in their table first), and the scratch baseline (the longest
    fine-tuning) first."""
    labels = job.labels
    if job.command == "pretrain":
        method = METHOD_TABLE.get(str(labels.get("method")))
        return (labels.get("attack") != "none") * 2.0 * (method.cost if method else 1.0)
    return 1.0 if labels.get("method") == SCRATCH and job.stage == "finetune" else 0.0


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

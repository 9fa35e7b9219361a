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
another (``workers=N``: N at a time), with their output in ``<study>/logs/``; ``launcher=NAME`` hands each stage's pending runs to
that Hydra launcher instead (``hydra/launcher=NAME``: ``slurm``, ``submitit_local``, ...), one sweep
per stage. Transfer (Table 1) starts from the best radius of each method x attack on the evaluated
average, so it is planned once the evaluations are in.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from advpt.runs import shown, summary
from advpt.study.plan import (
    ATTACKS,
    METHODS,
    Job,
    _list,
    _strings,
    arms,
    check,
    evaluate_job,
    finetune_job,
    finetune_jobs,
    knn_jobs,
    pretrain_jobs,
    probe_jobs,
    radius_name,
    transfer_jobs,
)
from advpt.study.runner import Interrupted, Runner, _duration

__all__ = [
    "ATTACKS",
    "METHODS",
    "Interrupted",
    "Job",
    "Runner",
    "arms",
    "check",
    "evaluate_job",
    "finetune_job",
    "finetune_jobs",
    "knn_jobs",
    "pretrain_jobs",
    "probe_jobs",
    "radius_name",
    "run",
    "run_study",
    "transfer_jobs",
]


def run_study(cfg: DictConfig, root: Path) -> int:
    """Plan, run and report the study in ``root``; the exit code (0: every run finished)."""
    check(cfg)
    exp = cfg.experiment
    runner = Runner(root, cfg.get("launcher"), bool(cfg.get("dry_run", False)), int(cfg.get("workers", 1)))
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
        probed = probe_jobs(cfg, root, pretrained)
        runner.stage("finetune", finetuned + probed)
        overrides = _strings(exp.evaluate.overrides)
        evaluated = [evaluate_job(cfg, root, j, overrides) for j in finetuned]
        probe_eval = _strings((exp.get("probe") or {}).get("evaluate"))
        evaluated += [evaluate_job(cfg, root, j, probe_eval) for j in probed]
        runner.stage("evaluate", evaluated + knn_jobs(cfg, root, pretrained))
        transfer = exp.get("transfer") or {}
        if transfer and _list(transfer.get("datasets")) and not runner.dry_run:
            from advpt.report.aggregate import best_by_arm
            from advpt.report.collect import collect

            # each method x attack's radius with the best average (at its best layer decay), as in Fig. 1
            best = best_by_arm(collect([root / "evaluate"]))
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
    report = None
    if cfg.get("report", True):
        from advpt.report import build_report

        report = root / "report"
        written = build_report([root], report, paper=True, note=runner.say)
        runner.say(f"report: {len(written)} files in {shown(report)}")
    took = time.monotonic() - started
    for job in runner.failed:
        runner.say(f"  failed: {job.stage} {job.name} (log: {shown(runner._log(job))})")
    busy = f", {runner.workers} worker(s) busy {100 * runner.busy / (took * runner.workers):.0f} % of it"
    headline = f"{len(runner.failed)} runs failed; took {_duration(took)}" + (busy if runner.busy else "")
    if runner.failed:  # the study skips what finished: the same command retries only what failed
        following = "the same command again, once the failed runs' logs are read"
    elif report is not None:
        following = f"open {shown(report / 'summary.md')}"
    else:
        following = f"advpt report runs={shown(root)}"
    print(summary("study", root, headline, following), flush=True)
    return 1 if runner.failed else 0


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    root = Path(HydraConfig.get().runtime.output_dir).resolve()
    code = run_study(cfg, root)
    if code:
        sys.exit(code)

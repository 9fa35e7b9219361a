"""What a study pays per run before and after its work: a fresh interpreter against a fork of the server.

    python benchmarks/study_startup.py                 # 6 short runs each way, one at a time
    python benchmarks/study_startup.py --runs 10

A study starts hundreds of short runs. Each run here is the same short job, an ``advpt evaluate`` of
the clean test split only (360 digits, a few milliseconds of model time), so its time is almost all
fixed cost: imports, composing and checking the config, building data and model, writing results.
It runs ``--runs`` times each way, alternating:

* fresh: ``python -m advpt.cli evaluate ...`` in a new interpreter, as every study ran before;
* forked: the study's own runner (``advpt.study.runner.Runner._run``), a process forked from the
  server that imported torch, Lightning and timm once (the server's own start is timed apart).

It prints each way's median wall-clock seconds per run and their ratio. The job's model is fine-tuned
once first (a few seconds) in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="runs each way")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from advpt.study.plan import Job
    from advpt.study.runner import Runner

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = root / "model"
        quiet = ["model=vit_micro", "trainer.enable_progress_bar=false"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "advpt.cli",
                "finetune",
                "pretrained=none",
                "trainer.max_steps=2",
                *quiet,
                f"hydra.run.dir={model}",
            ],
            check=True,
            capture_output=True,
        )

        def job(i: int) -> Job:
            overrides = [f"checkpoint={model}", "corruptions=false", "robust.enabled=false"]
            return Job("evaluate", "evaluate", f"e{i}", root / "runs" / f"e{i}", overrides, resumable=False)

        runner = Runner(root, launcher=None)
        started = time.perf_counter()
        runner._run(job(-1))  # the fork server starts and imports (once per study), then one run
        first = time.perf_counter() - started

        fresh, forked = [], []
        for i in range(args.runs):
            j = job(2 * i)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "advpt.cli", *j.argv()], check=True, capture_output=True)
            fresh.append(time.perf_counter() - t)
            t = time.perf_counter()
            code = runner._run(job(2 * i + 1))
            forked.append(time.perf_counter() - t)
            assert code == 0, (root / "logs" / "evaluate" / f"e{2 * i + 1}.log").read_text()[-2000:]

    a, b = statistics.median(fresh), statistics.median(forked)
    print(f"fork server's start, once per study: {first - b:.2f} s (its first run took {first:.2f} s)")
    print(f"{'way':<8} {'median s/run':>12}  runs")
    print(f"{'fresh':<8} {a:>12.2f}  {', '.join(f'{x:.2f}' for x in fresh)}")
    print(f"{'forked':<8} {b:>12.2f}  {', '.join(f'{x:.2f}' for x in forked)}")
    print(f"fresh / forked: {a / b:.1f}x")


if __name__ == "__main__":
    main()

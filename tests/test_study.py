"""`advpt study`: the plan of a grid, skipping what is finished, redoing what is stale, resuming."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMALL, run_cli
from hydra import compose, initialize_config_dir

from advpt.config import CONF_DIR
from advpt.study import Runner, evaluate_job, finetune_jobs, pretrain_jobs, run_study


def study_config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="study"):
        return compose("study", overrides=list(overrides))


def test_smoke_plan_names_every_run_by_what_it_computes(tmp_path: Path) -> None:
    cfg = study_config("experiment=smoke", "seeds=2")
    pre = pretrain_jobs(cfg, tmp_path)
    assert [j.name for j in pre[:4]] == ["mae-none-s0", "mae-l2-0.5-s0", "rotnet-none-s0", "rotnet-l2-0.5-s0"]
    assert [j.name for j in pre[4:10]] == [
        f"{m}-{a}-s0" for m in ("dino", "mocov3", "simclr") for a in ("none", "l2-0.5")
    ]
    assert len(pre) == 20 and pre[10].name == "mae-none-s1"
    assert pre[1].overrides[:4] == ["method=mae", "attack=l2", "eps=0.5", "seed=0"]
    assert "model=vit_micro" in pre[1].overrides and pre[1].argv()[-2:] == [
        "resume=auto",
        f"hydra.run.dir={pre[1].directory}",
    ]
    ft = finetune_jobs(cfg, tmp_path, pre)
    assert len(ft) == 20 * 2 + 2  # two layer decays per pre-trained model, a scratch model per seed
    assert ft[0].name == "mae-none-s0-builtin-adamw_lld-ld0.65" and ft[0].needs is pre[0]
    assert f"pretrained={pre[0].directory}" in ft[0].overrides and "layer_decay=0.65" in ft[0].overrides
    scratch = ft[-1]
    assert scratch.name == "scratch-s1-builtin-adamw_lld-ld1.0" and "pretrained=none" in scratch.overrides
    assert scratch.labels["method"] == "scratch" and "seed=1" in scratch.overrides


def _touch(path: Path, when: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    os.utime(path, (when, when))


def _finish_everything(cfg, root: Path) -> list:
    """Write every planned run's product, each newer than the one it starts from."""
    pre = pretrain_jobs(cfg, root)
    ft = finetune_jobs(cfg, root, pre)
    ev = [evaluate_job(cfg, root, j, []) for j in ft]
    now = time.time() - 1000
    for offset, jobs in enumerate((pre, ft, ev)):
        for job in jobs:
            _touch(job.product, now + 100 * offset)
    return ev


def test_a_finished_study_starts_no_run(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = study_config(*SMALL, "report=false")
    _finish_everything(cfg, tmp_path)
    monkeypatch.setattr(Runner, "_run", lambda self, job: pytest.fail(f"started {job.name}"))
    assert run_study(cfg, tmp_path) == 0
    out = capsys.readouterr().out
    assert "pretrain 2/2 done" in out and "finetune 3/3 done" in out and "evaluate 3/3 done" in out


def test_a_model_trained_again_is_evaluated_again(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = study_config(*SMALL, "report=false")
    ev = _finish_everything(cfg, tmp_path)
    retrained = ev[1].needs
    _touch(retrained.product, time.time())  # the fine-tuned model is now newer than its evaluation
    ran: list[str] = []

    def fake_run(self, job) -> int:
        ran.append(job.name)
        _touch(job.product, time.time())
        return 0

    monkeypatch.setattr(Runner, "_run", fake_run)
    assert run_study(cfg, tmp_path) == 0
    assert ran == [ev[1].name]
    moved = [p.name for p in (tmp_path / "evaluate").iterdir() if ".stale-" in p.name]
    assert len(moved) == 1 and moved[0].startswith(ev[1].name)  # the old result is kept aside, not deleted
    assert "evaluate 2/3 done, 1 to run" in capsys.readouterr().out


def test_a_failed_run_blocks_only_what_depends_on_it(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = study_config(*SMALL, "report=false")

    def fake_run(self, job) -> int:
        if job.name == "mae-l2-0.5-s0":
            return 1
        _touch(job.product, time.time())
        return 0

    monkeypatch.setattr(Runner, "_run", fake_run)
    assert run_study(cfg, tmp_path) == 1
    out = capsys.readouterr().out
    assert "pretrain mae-l2-0.5-s0 failed (exit 1" in out
    assert "finetune 0/3 done, 2 to run, 1 waiting on a failed run" in out
    assert "1 runs failed" in out
    # it ends as every command does: what it did, where, and what to do next
    ending = out.rstrip().splitlines()[-3:]
    assert ending[0].startswith("advpt study: 1 runs failed; took ")
    assert ending[1] == f"  run:  {tmp_path}"
    assert ending[2].startswith("  next: the same command again")


def test_a_finished_study_ends_naming_its_report(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = study_config(*SMALL, "report=false")
    monkeypatch.setattr(Runner, "_run", lambda self, job: _touch(job.product, time.time()) or 0)
    assert run_study(cfg, tmp_path) == 0
    ending = capsys.readouterr().out.rstrip().splitlines()[-3:]
    assert ending[0].startswith("advpt study: 0 runs failed; took ")
    assert ending[1:] == [f"  run:  {tmp_path}", f"  next: advpt report runs={tmp_path}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment.pretrain.methods=[swav]"], "unknown method 'swav'"),
        (["seeds=0"], "seeds=0 is invalid"),
        (["workers=0"], "workers=0 is invalid"),
        (["experiment=paper_fig1"], "pass data_root=PATH"),
        (["experiment=nope"], "unknown experiment option 'nope'"),
    ],
)
def test_bad_studies_are_one_line_and_write_nothing(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "study"
    assert run_cli(["study", *args, f"hydra.run.dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def _study(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "advpt.cli", "study", *SMALL, f"hydra.run.dir={out}", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return done, time.monotonic() - started


@pytest.mark.slow
def test_a_study_through_a_hydra_launcher_reports_and_a_local_rerun_only_does_what_is_left(
    tmp_path: Path,
) -> None:
    out = tmp_path / "study"
    arms = ["~experiment.pretrain.attacks.none"]  # one pre-trained arm and the scratch baseline
    # First through a Hydra launcher (one sweep per stage)...
    first, took = _study(out, *arms, "launcher=basic")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pretrain 1/1 done" in first.stdout and "evaluate 2/2 done" in first.stdout
    config = (out / "pretrain" / "mae-l2-0.5-s0" / "config.yaml").read_text()
    assert "name: l2" in config and "eps: 0.5" in config  # the arm's settings reached the job
    for name in ("fig1_eps.png", "fig2_variants.png", "table1_transfer.md", "summary.md"):
        assert (out / "report" / name).is_file(), name
    assert "fig1: no from-scratch" not in first.stdout  # the scratch baseline ran
    # ...then locally: the launcher filled the same folders, so nothing is left to run.
    again, took_again = _study(out, *arms)
    assert again.returncode == 0 and "to run" not in again.stdout
    assert took_again < took / 4
    # a fine-tuning run that stopped half-way: its product gone, its last.ckpt kept
    half = out / "finetune" / "mae-l2-0.5-s0-builtin-adamw_lld-ld0.65"
    (half / "model.safetensors").unlink()
    third, _ = _study(out, *arms)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "finetune 1/2 done, 1 to run" in third.stdout and "evaluate 1/2 done, 1 to run" in third.stdout
    assert "pretrain 1/1 done" in third.stdout and "pretrain 1/1 done," not in third.stdout
    # The log is appended to by every study: the third study's own part starts at its last command.
    third_part = (out / "logs" / "finetune" / f"{half.name}.log").read_text().rsplit("$ advpt finetune", 1)[1]
    assert "resume=auto" in third_part.splitlines()[0]
    assert f"resuming {half / 'checkpoints' / 'last.ckpt'} from step 6" in third_part, third_part
    assert (half / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("experiment", "pretrain", "finetune"),
    [
        ("mini", 36, 40),
        ("mini_all_labels", 24, 50),
        ("paper_fig1", 48, 49),
        ("paper_fig3", 3, 13),
        ("paper_table1", 12, 12),
    ],
)
def test_shipped_experiments_plan_the_paper_grids(tmp_path: Path, experiment, pretrain, finetune) -> None:
    cfg = study_config(f"experiment={experiment}", f"data_root={tmp_path}", f"variants_root={tmp_path}")
    pre = pretrain_jobs(cfg, tmp_path)
    assert len(pre) == pretrain and len({j.name for j in pre}) == pretrain
    assert len(finetune_jobs(cfg, tmp_path, pre)) == finetune
    if experiment.startswith("paper"):
        assert all("recipe=paper" in j.overrides and f"data.root={tmp_path}" in j.overrides for j in pre)


def test_table1_experiment_uses_the_radii_of_the_papers_caption(tmp_path: Path) -> None:
    from advpt.report import paper_values
    from advpt.report.collect import radius_value

    best = paper_values()["best_radius"]
    cfg = study_config("experiment=paper_table1", f"data_root={tmp_path}", f"variants_root={tmp_path}")
    arms = {(j.labels["method"], j.labels["attack"]): j.labels["eps"] for j in pretrain_jobs(cfg, tmp_path)}
    for (method, attack), eps in arms.items():
        if attack != "none":
            assert radius_value(eps) == pytest.approx(radius_value(best[attack][method])), (method, attack)
    assert len(arms) == 12


@pytest.mark.parametrize(
    "experiment", ["paper_fig1", "paper_fig3", "paper_table1", "mini", "mini_all_labels"]
)
def test_shipped_experiments_runs_are_valid_command_lines(tmp_path: Path, experiment) -> None:
    """Every pre-training run and the scratch model of each experiment pass the command's own checks."""
    from advpt.config import validate

    for split in ("train", "val"):
        (tmp_path / "in" / split / "n01").mkdir(parents=True)
    cfg = study_config(
        f"experiment={experiment}", f"data_root={tmp_path / 'in'}", f"variants_root={tmp_path}"
    )
    pre = pretrain_jobs(cfg, tmp_path / "s")
    for job in pre:
        validate("pretrain", job.overrides, multirun=False)
    for job in finetune_jobs(cfg, tmp_path / "s", pre):
        if job.needs is None:
            validate("finetune", job.overrides, multirun=False)


def test_jobs_run_workers_at_a_time_longest_first(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = study_config(*SMALL, "report=false", "workers=2")
    running: set[str] = set()
    most, started = 0, []

    def fake_run(self, job) -> int:
        nonlocal most
        running.add(job.name)
        started.append(job.name)
        most = max(most, len(running))
        time.sleep(0.3)
        _touch(job.product, time.time())
        running.discard(job.name)
        return 0

    monkeypatch.setattr(Runner, "_run", fake_run)
    assert run_study(cfg, tmp_path) == 0
    assert most == 2  # two at a time, never more
    assert started[0] == "mae-l2-0.5-s0"  # adversarial pre-training, the longer, starts first
    assert "evaluate 3/3 done" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_stops_every_running_job_of_a_study_with_its_last_checkpoint(tmp_path: Path) -> None:
    import signal

    out = tmp_path / "study"
    long = "experiment.pretrain.overrides=['trainer.max_steps=100000','trainer.max_epochs=-1','data.batch_size=32']"
    argv = [sys.executable, "-m", "advpt.cli", "study", *SMALL, "workers=2", long, f"hydra.run.dir={out}"]
    study = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    logs = [out / "logs" / "pretrain" / f"{arm}-s0.log" for arm in ("mae-l2-0.5", "mae-none")]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and "Epoch 1" in p.read_text(errors="replace") for p in logs):
        assert study.poll() is None and time.monotonic() < deadline, (
            study.stdout.read() if study.stdout else ""
        )
        time.sleep(0.5)
    study.send_signal(signal.SIGTERM)
    text, _ = study.communicate(timeout=120)
    assert study.returncode == 143, text
    assert "stopped (signal SIGTERM); rerun the same command to continue" in text
    for arm in ("mae-l2-0.5", "mae-none"):  # both runs in flight saved where they stopped
        assert (out / "pretrain" / f"{arm}-s0" / "checkpoints" / "last.ckpt").is_file(), arm


def _last(job, key: str) -> str | None:
    """The value a job's command line gives ``key`` (the last one wins, as in Hydra)."""
    values = [o.partition("=")[2] for o in job.overrides if o.partition("=")[0] == key]
    return values[-1] if values else None


def test_mini_all_labels_trains_scratch_for_as_many_steps_as_pretraining_and_fine_tuning(
    tmp_path: Path,
) -> None:
    cfg = study_config("experiment=mini_all_labels")
    pre = pretrain_jobs(cfg, tmp_path)
    tuned = finetune_jobs(cfg, tmp_path, pre)
    scratch = [j for j in tuned if j.labels["method"] == "scratch"]
    pretrained = [j for j in tuned if j.labels["method"] != "scratch"]
    assert len(scratch) == cfg.seeds >= 2
    epochs = (
        {int(_last(j, "trainer.max_epochs")) for j in pre},
        {int(_last(j, "trainer.max_epochs")) for j in pretrained},
    )
    (p,), (f,) = epochs
    # the same data and batch on both sides (none sets its own), so epochs count the same optimiser steps
    assert all(_last(j, "data.batch_size") is None for j in [*pre, *tuned])
    assert all(int(_last(j, "trainer.max_epochs")) == p + f for j in scratch)


def test_mini_scores_every_model_on_the_same_images(tmp_path: Path) -> None:
    cfg = study_config("experiment=mini")
    pre = pretrain_jobs(cfg, tmp_path)
    scored = [
        evaluate_job(cfg, tmp_path, j, list(cfg.experiment.evaluate.overrides))
        for j in finetune_jobs(cfg, tmp_path, pre)
    ]
    # one evaluation seed (the default) and the same caps for all: the report can pair every difference
    settings = {tuple(o for o in j.overrides if not o.startswith("checkpoint=")) for j in scored}
    assert len(settings) == 1 and not any(o.startswith("seed=") for o in settings.pop())
    assert "robust.max_images=null" in cfg.experiment.evaluate.overrides  # the whole test split


def test_mini_fine_tunes_every_arm_and_scratch_on_the_same_scarce_labels_at_the_paper_s_radii(
    tmp_path: Path,
) -> None:
    from advpt.report.collect import radius_value
    from advpt.study import knn_jobs, probe_jobs

    cfg = study_config("experiment=mini")
    pre = pretrain_jobs(cfg, tmp_path)
    tuned = finetune_jobs(cfg, tmp_path, pre)
    probes = probe_jobs(cfg, tmp_path, pre)
    # every arm of every seed and the scratch baseline: the same 100 labelled images (one draw, labels_seed
    # 0), so seeds differ in initialisation, pre-training and order, not in which labels they see
    for job in [*tuned, *probes]:
        assert _last(job, "data.labels_per_class") == "10" and _last(job, "data.labels_seed") == "0"
        assert int(_last(job, "seed")) == job.labels["seed"]
    assert all(int(_last(j, "optim.min_steps")) >= 700 for j in tuned)
    # the probe's lr held near MAE's actual 6.4 (16 x 64 / 256 = 4), where LARS's trust ratio lets the head move
    assert all(int(_last(j, "optim.min_steps")) >= 500 and float(_last(j, "optim.lr")) >= 1 for j in probes)
    assert {_last(j, "optim") for j in probes} == {"linear_probe"} and len(probes) == len(pre)
    assert [j.needs for j in knn_jobs(cfg, tmp_path, pre)] == pre
    # the experiment's radii are the paper's at 224 px: l2 converted to 32 px, l_inf as written
    for job in pre:
        attack, given = job.labels["attack"], _last(job, "eps")
        paper = job.name.split("-")[2].replace("_", "/") if attack != "none" else None
        if attack == "l2":
            assert float(given) == pytest.approx(radius_value(paper) * 32 / 224)
        elif attack == "linf":
            assert radius_value(given) == pytest.approx(radius_value(paper))

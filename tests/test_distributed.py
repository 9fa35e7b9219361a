"""Several processes, started as users start them: ``advpt ... trainer.devices=2 trainer.strategy=ddp``
(2 CPU processes over gloo), a sweep of such runs, torchrun, submitit; pre-emption and ``resume=auto``;
environment errors as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load, one_line, run_cli
from safetensors.torch import load_file

from advpt.method_table import METHOD_TABLE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Under `pytest -n` (make test) these run one after another on one worker (two multi-process runs at
# once on a 2-core machine only wait on each other), except the three that share the two sweeps,
# which form a group of their own (so each sweep runs once) beside it.
pytestmark = pytest.mark.xdist_group("processes")
ADVPT = str(BIN / "advpt")
QUIET = ["model=vit_micro", "trainer.enable_progress_bar=false"]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def advpt(args: list[str], cwd: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """The console command in a fresh process, exactly as a user types it."""
    return subprocess.run([ADVPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def stop_after_first_checkpoint(args: list[str], run: Path) -> str:
    """``advpt ARGS hydra.run.dir=RUN`` sent SIGUSR1 (SLURM's warning; SIGTERM takes the same path) as
    soon as its first ``last.ckpt`` exists; asserts it stopped as pre-empted (143); its stderr."""
    proc = subprocess.Popen(
        [ADVPT, *args, f"hydra.run.dir={run}"],
        cwd=run.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    return err


def outputs(run: Path) -> dict[str, int]:
    names = ("last.ckpt", "metrics.csv", "encoder.safetensors", "model.safetensors")
    return {n: len(list(run.rglob(n))) for n in names}


def same_weights(a: Path, b: Path, atol: float = 0.0) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return all(torch.allclose(wa[k], wb[k], rtol=0, atol=atol) for k in wa)


# -- DDP and FSDP from the console command ------------------------------------------------------
# FSDP runs also recompute activations: the same weights as DDP's show it changes no update either.
FSDP = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=fsdp",
    "activation_checkpointing=true",
]
# Every method adversarially for 8 steps, mid-way through the first epoch (11 steps of 2 x 64 digits).
SWEEP = ["attack=l2", "trainer.max_steps=8", *QUIET]


# FSDP = DDP for every method but RotNet (its step is supervised pre-training's with rotated inputs)
SHARDED = [m for m in METHOD_TABLE if m != "rotnet"]


def sweep(methods: str, placement: list[str], folder: Path) -> Path:
    """``advpt pretrain -m method=METHODS`` on two processes, as a user types it; the sweep folder.

    A sweep that does not end in time fails with what it printed and the jobs it finished, so a job that
    hangs is named in the failure."""
    args = ["pretrain", "-m", f"method={methods}", *SWEEP, f"hydra.sweep.dir={folder / 'sweep'}", *placement]
    try:
        done = advpt(args, cwd=folder, timeout=180 * len(methods.split(",")))
    except subprocess.TimeoutExpired as e:
        finished = sorted(p.parent.name for p in folder.rglob("encoder.safetensors"))
        said = [s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (e.stdout, e.stderr)]
        said = [s[-3000:] for s in said]
        pytest.fail(f"the sweep did not end in {e.timeout:.0f} s; finished: {finished}\n" + "\n".join(said))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "sweep"


def job(swept: Path, method: str) -> Path:
    return next(p for p in swept.iterdir() if f"method-{method}+" in p.name)


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sweep(",".join(METHOD_TABLE), DDP, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sweep(",".join(SHARDED), FSDP, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.slow
@pytest.mark.xdist_group("sweeps")
def test_every_method_runs_adversarially_on_two_processes_in_one_sweep(ddp_sweep: Path) -> None:
    # The adversarial step holds the nominal one; nominal runs on two processes are the half-batch
    # tests' (supervised pre-training, fine-tuning) and the probe's (MAE).
    jobs = sorted(p for p in ddp_sweep.iterdir() if p.is_dir())
    placement = (
        "model-vit_micro+trainer.accelerator-cpu+trainer.devices-2+trainer.max_steps-8+trainer.strategy-ddp"
    )
    assert [p.name for p in jobs] == [
        f"{i}-attack-l2+method-{m}+{placement}" for i, m in enumerate(METHOD_TABLE)
    ]
    for each in jobs:  # each job's two processes wrote into that job's directory, once
        assert outputs(each) == {
            "last.ckpt": 1,
            "metrics.csv": 1,
            "encoder.safetensors": 1,
            "model.safetensors": 0,
        }, each
        assert torch.load(each / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert sorted(p.name for p in ddp_sweep.parent.iterdir()) == ["sweep"]  # nothing written elsewhere

    # Fine-tuning on two processes from one of them.
    run = ddp_sweep.parent / "ft"
    done = advpt(
        ["finetune", f"pretrained={jobs[1]}", "trainer.max_steps=3", f"hydra.run.dir={run}", *DDP],
        cwd=ddp_sweep.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(run) == {
        "last.ckpt": 1,
        "metrics.csv": 1,
        "encoder.safetensors": 0,
        "model.safetensors": 1,
    }


@pytest.mark.slow
@pytest.mark.xdist_group("sweeps")
def test_fsdp_trains_every_method_adversarially_to_the_weights_of_ddp(
    ddp_sweep: Path, fsdp_sweep: Path
) -> None:
    """``trainer.strategy=fsdp`` (FSDP2), with activation checkpointing, takes the steps DDP takes,
    attack included (same batches, masks, mixup draws and batch-norm statistics on each process):
    the same encoder, to float rounding, exported as the same plain timm state dict, from one
    checkpoint file."""
    for method in SHARDED:
        sharded, replicated = job(fsdp_sweep, method), job(ddp_sweep, method)
        assert "trainer.strategy-fsdp" in sharded.name
        assert outputs(sharded) == {
            "last.ckpt": 1,
            "metrics.csv": 1,
            "encoder.safetensors": 1,
            "model.safetensors": 0,
        }, sharded
        ckpt = torch.load(sharded / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 8
        reference = torch.load(replicated / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["state_dict"].keys() == reference["state_dict"].keys()  # whole, unsharded names
        ws = load_file(str(sharded / "encoder.safetensors"))
        wr = load_file(str(replicated / "encoder.safetensors"))
        assert {k: v.shape for k, v in ws.items()} == {k: v.shape for k, v in wr.items()}
        for name in wr:
            torch.testing.assert_close(ws[name], wr[name], rtol=0, atol=1e-4, msg=f"{method}: {name}")
        # ...and both trained: the sharded run's optimiser holds non-zero gradient averages.
        state = ckpt["optimizer_states"][0]["state"]
        assert any(s["exp_avg"].abs().max() > 1e-6 for s in state.values())


@pytest.mark.slow
@pytest.mark.xdist_group("sweeps")
def test_fsdp_sigterm_mid_epoch_then_resume_auto_equals_the_uninterrupted_run(
    fsdp_sweep: Path, tmp_path: Path
) -> None:
    """Stopped by a signal, an FSDP run saves ``last.ckpt`` (gathered from both processes), continues
    with ``resume=auto`` to the uninterrupted run's weights, then further with a larger max_steps; its
    encoder fine-tunes on one process."""
    args = ["pretrain", "method=mae", *SWEEP, *FSDP, "checkpoint_every_n_steps=2", "resume=auto"]
    run = tmp_path / "stopped"
    stop_after_first_checkpoint(args, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < stopped_at < 8, stopped_at
    assert not (run / "encoder.safetensors").exists()

    again = advpt([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"from step {stopped_at}" in again.stdout
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8
    assert same_weights(run / "encoder.safetensors", job(fsdp_sweep, "mae") / "encoder.safetensors")

    longer = advpt([*args, "trainer.max_steps=10", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 10

    tuned = tmp_path / "ft"
    assert (
        run_cli(["finetune", f"pretrained={run}", "trainer.max_steps=2", f"hydra.run.dir={tuned}", *QUIET])
        == 0
    )
    assert (tuned / "model.safetensors").is_file()


def _raw_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights in a ``last.ckpt`` (not an exported average) and the optimiser's state."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer_states"][0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        # AdamW (supervised pre-training, no weight EMA: the raw weights are compared)
        [
            "pretrain",
            "method=supervised",
            "attack=none",
            "method.mixup=0",
            "method.cutmix=0",
            "method.ema_decay=0",
            "method.drop_path_rate=0",  # per-process random draws differ from one process's
            "method.min_lr=1e-4",  # the cosine ends above 0: the last step moves the weights too
        ],
        # SGD (transfer fine-tuning): unlike AdamW, it would see summed instead of averaged gradients
        ["finetune", "pretrained=none", "optim=sgd_transfer", "optim.min_lr=1e-4"],
    ],
    ids=["adamw", "sgd"],
)
def test_two_processes_with_half_the_batch_give_the_same_update(command: list[str], tmp_path: Path) -> None:
    """2 x B/2 equals 1 x B, under DDP and under FSDP: same global batches, averaged gradients, and
    the learning rate scaled by the global batch."""
    common = [*command, "trainer.max_steps=4", "trainer.accelerator=cpu", *QUIET]
    # The one-process reference in this process (no launch to test there); the two processes as users
    # start them: DDP (recomputing activations, which changes no update) and FSDP.
    assert run_cli([*common, "data.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}"]) == 0
    for name, placement in (("ddp", [*DDP[1:], "activation_checkpointing=true"]), ("fsdp", FSDP[1:3])):
        two = advpt(
            [*common, "data.batch_size=16", *placement, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path
        )
        assert two.returncode == 0, two.stderr[-3000:]
    w1, opt1 = _raw_state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    for run in ("ddp", "fsdp"):
        w2, _ = _raw_state(tmp_path / run / "checkpoints" / "last.ckpt")
        assert w1.keys() == w2.keys() and not any("ema" in k for k in w1)
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-5, msg=f"{run}: {name}")
    # ...and the update was not empty: a learning rate above 0 at the end and non-zero gradient statistics.
    assert opt1["param_groups"][0]["lr"] > 0
    key = "momentum_buffer" if command[0] == "finetune" else "exp_avg"
    assert any(s[key].abs().max() > 1e-6 for s in opt1["state"].values())


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    """One 2-process launch of tests/ddp_probe.py running every mode; the folder of what it recorded."""
    out = tmp_path_factory.mktemp("probe") / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "ddp_probe.py"),
            "nominal,attacked,byol,monitor,fsdp_nominal,fsdp_attacked,fsdp_hooks_attacked,fsdp_byol",
            str(out),
        ],
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_attack_adds_no_gradient_synchronisation(probed: Path) -> None:
    import json

    counts = {
        (mode, rank): json.loads((probed / f"{mode}{rank}.json").read_text())
        for mode in ("nominal", "attacked")
        for rank in (0, 1)
    }
    per_step = {k: v["reductions"] / v["steps"] for k, v in counts.items()}
    assert all(v["steps"] == 3 for v in counts.values())
    assert per_step[("nominal", 0)] >= 1
    assert per_step[("attacked", 0)] == per_step[("nominal", 0)]
    assert per_step[("attacked", 1)] == per_step[("nominal", 1)]


@pytest.mark.slow
def test_the_knn_monitor_on_two_processes_gives_the_numbers_of_one(probed: Path) -> None:
    """Each rank encodes and attacks its share (uneven: 5 and 4 batches); the gathered features, labels
    and attacked features equal one process's bit for bit, and so do the kNN top-1 (advpt.training.monitor)."""
    found = torch.load(probed / "monitor.pt")
    assert found["two"] == found["one"], found
    for two, one in zip(found["features_two"], found["features_one"], strict=True):
        assert torch.equal(two, one)
    assert len(found["features_one"][0]) == 45 and 0 < found["one"]["monitor/knn_top1"] <= 1


def _collectives(probed: Path, mode: str) -> dict[str, float]:
    """FSDP's all-gathers and reduce-scatters per optimiser step, the same on both processes."""
    import json

    counts = [json.loads((probed / f"{mode}{rank}.json").read_text()) for rank in (0, 1)]
    assert counts[0] == counts[1] and counts[0]["steps"] == 3
    return {k: v / 3 for k, v in counts[0].items() if k != "steps"}


@pytest.mark.slow
def test_under_fsdp_the_attack_gathers_each_group_once_and_reduces_nothing(probed: Path) -> None:
    """Adversarial MAE (PGD-2) under FSDP: one all-gather per sharded group for the whole attack
    (FSDP's hooks alone would gather every group in each of its 2 x K passes), and no reduce-scatter:
    the attack computes input gradients only."""
    from helpers import make_method

    from advpt.training.sharding import blocks, networks

    mae = make_method("mae")
    groups = len(blocks(mae)) + len(list(networks(mae)))  # every group holds trainable weights
    nominal = _collectives(probed, "fsdp_nominal")
    attacked = _collectives(probed, "fsdp_attacked")
    hooks = _collectives(probed, "fsdp_hooks_attacked")
    assert nominal == {"all_gather": 2 * groups, "reduce_scatter": groups}  # forward + backward; gradients
    assert attacked == {"all_gather": 3 * groups, "reduce_scatter": groups}
    assert hooks == {"all_gather": (2 + 2 * 2) * groups, "reduce_scatter": groups}


@pytest.mark.slow
def test_under_fsdp_the_byol_target_is_the_ema_of_the_online_network_on_every_rank(probed: Path) -> None:
    """Each process lerps its own shards of the target towards its shards of the online network:
    gathered whole, the target after the last update is (1 - tau) online + tau target on both."""
    found = [torch.load(probed / f"fsdp_byol{rank}.pt") for rank in (0, 1)]
    for rank, seen in enumerate(found):
        tau, before, after, online = seen["tau"], seen["before"], seen["after"], seen["online"]
        assert 0 < tau < 1
        weights = [k for k in after if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert any(k.startswith("projector") for k in weights) and any(
            k.startswith("encoder") for k in weights
        )
        for k in weights:
            expected = torch.lerp(before[k], online[k], 1.0 - tau)
            torch.testing.assert_close(after[k], expected, rtol=0, atol=1e-6, msg=f"rank {rank}: {k}")
        for k in weights:  # and both processes hold the same target (batch-norm statistics: see above)
            assert torch.equal(after[k], found[0]["after"][k]), k


@pytest.mark.slow
def test_byol_target_stays_identical_across_ranks(probed: Path) -> None:
    """The EMA of DDP-synchronised weights is the same on every rank. (Batch-norm running statistics
    are copied from the online heads, which DDP re-broadcasts from rank 0 at every forward; the
    target itself normalises with batch statistics, in train mode.)"""
    t0 = torch.load(probed / "target0.pt")
    t1 = torch.load(probed / "target1.pt")
    assert t0.keys() == t1.keys()
    weights = [k for k in t0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any("projector" in k for k in weights)
    for k in weights:
        assert torch.equal(t0[k], t1[k]), k


def test_synchronised_batch_norm_on_cpu_processes_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", "method=byol", "trainer.sync_batchnorm=true", *DDP]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "trainer.sync_batchnorm=true needs GPUs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_starts_one_run(tmp_path: Path) -> None:
    torchrun = BIN / "torchrun"
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "--no-python",
            ADVPT,
            "pretrain",
            "trainer.max_steps=2",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            *QUIET,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p.parent.parent for p in (tmp_path / "outputs").rglob("last.ckpt")]
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    assert len(list((tmp_path / "outputs").rglob("config.yaml"))) == 2  # ours + Hydra's, one run dir


# -- pre-emption and resume=auto ----------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_auto_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # 30 steps cross an epoch end (22 steps of 64 digits); the stop lands a few steps in.
    args = ["pretrain", "trainer.max_steps=30", "checkpoint_every_n_steps=2", "resume=auto", *QUIET]
    whole = advpt([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "stopped"
    err = stop_after_first_checkpoint(args, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < stopped_at < 22, stopped_at  # mid-epoch
    assert "Continue with: advpt pretrain" in err and "resume=auto" in err
    assert not (run / "encoder.safetensors").exists()

    again = advpt([*args, f"hydra.run.dir={run}"], cwd=tmp_path)  # the same command line, requeued
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(ckpt, weights_only=False)["global_step"] == 30
    assert same_weights(run / "encoder.safetensors", tmp_path / "whole" / "encoder.safetensors")

    # Once more: the run is finished, so it says so and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    finished = advpt([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert finished.returncode == 0 and "already finished at step 30" in finished.stdout
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        run_cli(["pretrain", "resume=auto", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'r'}", *QUIET])
        == 0
    )
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()


def test_a_resume_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert run_cli(["pretrain", f"resume={bad}"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "is not a readable checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- environment errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["trainer.accelerator=gpu"], "trainer.accelerator=gpu"),
        (["trainer.strategy=no_such_strategy"], "trainer.strategy=no_such_strategy"),
        (["trainer.precision=64-bogus"], "trainer.precision=64-bogus"),
    ],
)
def test_what_this_machine_lacks_is_one_line_exit_2(args, needle, tmp_path, monkeypatch, capsys) -> None:
    if torch.cuda.is_available() and "gpu" in args[0]:
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, None, needle, "this machine has")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_more_cpu_processes_than_cores_is_one_line_before_anything_starts(
    accelerator: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from advpt.config.machine import cpu_cores

    if accelerator == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPUs here")
    monkeypatch.chdir(tmp_path)
    cores = cpu_cores()
    args = [f"trainer.accelerator={accelerator}", f"trainer.devices={cores + 1}", "trainer.strategy=ddp"]
    assert run_cli(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    one_line(err)
    assert f"trainer.devices={cores + 1} would start {cores + 1} CPU processes on {cores} cores" in err
    assert list(tmp_path.iterdir()) == []  # (trainer.accelerator=cpu: before any heavy import, test_cli)


def test_an_unresolvable_master_address_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    assert run_cli(["pretrain", *DDP]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "MASTER_ADDR=no-such-host.invalid cannot be resolved")
    assert list(tmp_path.iterdir()) == []


# -- SLURM through submitit -----------------------------------------------------------------------
def test_slurm_launcher_composes_one_task_per_gpu() -> None:
    from hydra import compose, initialize_config_dir

    from advpt.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.account=lab",
                "hydra.launcher.gpus_per_node=4",
                "trainer.num_nodes=2",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert (launcher.partition, launcher.account) == ("gpu", "lab")
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0 and launcher.timeout_min > 0


@pytest.mark.slow
def test_a_sweep_through_submitit_runs_each_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = advpt(
        [
            "pretrain",
            "-m",
            "hydra/launcher=submitit_local",
            "method=mae,rotnet",
            "trainer.max_steps=1",
            "trainer.accelerator=cpu",
            f"hydra.sweep.dir={sweep}",
            *QUIET,
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.rglob("encoder.safetensors")) == [
        f"{i}-method-{m}+model-vit_micro+trainer.accelerator-cpu+trainer.max_steps-1"
        for i, m in enumerate(("mae", "rotnet"))
    ]


def test_run_stamp_names_external_launches(monkeypatch) -> None:
    from advpt.config import run_stamp

    for key in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert run_stamp("%Y") == time.strftime("%Y")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_stamp("%Y") == "torchrun-abc"
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert run_stamp("%Y") == "slurm-77.0"  # every task of the step, and the requeued job, agree


def test_docker_image_installs_this_package_on_a_torch_that_satisfies_it() -> None:
    """No Docker engine runs here, so the image is checked by what it is built from."""
    import re

    import tomllib
    from packaging.requirements import Requirement

    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-", text, re.M)
    assert base, "the image starts from an official PyTorch image"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(base.group(1)), (torch_req, base.group(1))
    assert re.search(r"^RUN pip install \. ", text, re.M)  # the package itself, nothing pinned beside it
    assert re.search(r"^USER advpt$", text, re.M) and re.search(r'^ENTRYPOINT \["advpt"\]', text, re.M)
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


# -- speed settings -------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_blocks_in_bf16_train_under_the_attack(tmp_path: Path, monkeypatch) -> None:
    import csv
    import json
    import math

    import timm
    from timm.models.vision_transformer import Block
    from torch._dynamo.utils import counters

    compiled: list[type] = []
    original = torch.nn.Module.compile

    def spy(module, *args, **kwargs):
        compiled.append(type(module))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    counters.clear()
    run = tmp_path / "run"
    args = ["method=mae", "attack=l2", "compile=true", "trainer.precision=bf16-mixed", "trainer.max_steps=2"]
    assert run_cli(["pretrain", *args, f"hydra.run.dir={run}", *QUIET]) == 0
    # Every transformer block, encoder and decoder, was compiled, and dynamo did produce graphs.
    spec = json.loads((run / "encoder.json").read_text())
    vit = timm.create_model(spec["name"], **spec["kwargs"])
    vit.load_state_dict(load_file(str(run / "encoder.safetensors")))  # compiled in place: same names
    decoder_depth = load("method", "mae")["decoder"]["32"]["depth"]  # vit_micro is 32 wide
    assert compiled == [Block] * (len(vit.blocks) + decoder_depth), compiled
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    # ...and trained under the attack: finite losses, a perturbation of non-zero norm at every step.
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    norms = [float(r["train/delta_norm"]) for r in rows if r.get("train/delta_norm")]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert norms and all(0 < v <= 0.5 + 1e-3 for v in norms), norms


@pytest.mark.slow
def test_two_nodes_started_by_hand_join_one_run(tmp_path: Path) -> None:
    """``trainer.num_nodes=2``: the same command on each node with NODE_RANK, MASTER_ADDR/PORT set."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = [
        ADVPT,
        "pretrain",
        "trainer.max_steps=2",
        "trainer.num_nodes=2",
        f"hydra.run.dir={run}",
        *QUIET,
        *DDP,
    ]
    args = [a for a in args if a != "trainer.devices=2"] + ["trainer.devices=1"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [
        subprocess.Popen(
            args, cwd=tmp_path, env={**env, "NODE_RANK": str(r)}, stderr=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "MEMBER: 2/2" in errors[0] + errors[1]
    assert outputs(run)["last.ckpt"] == 1 and outputs(run)["encoder.safetensors"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["fsdp", "ddp"])
@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_image_loggers_on_two_processes_finish_and_log_images(
    placement: str, logger: str, tmp_path: Path
) -> None:
    """MAE's reconstructions are a forward pass: under FSDP every process must make it, or the one that
    does waits forever for the others' shards (this hung before). Rank 0 alone writes the images."""
    run = tmp_path / "run"
    args = ["pretrain", *QUIET, "trainer.max_steps=3", "monitor=none", f"logger={logger}"]
    args += [*(FSDP if placement == "fsdp" else DDP), f"hydra.run.dir={run}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HOME": str(tmp_path)}
    env.pop("WANDB_API_KEY", None)
    started = time.monotonic()
    done = advpt(args, cwd=tmp_path, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 90
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

        (events,) = run.rglob("events.out.tfevents.*")
        tags = EventAccumulator(str(events), size_guidance={IMAGES: 0}).Reload().Tags()[IMAGES]
        assert {"images/adversarial_examples", "images/mae_reconstructions"} <= set(tags), tags
    else:
        logged = [p for p in run.rglob("*.png") if "media" in p.parts]
        assert any("mae_reconstructions" in p.name for p in logged), logged

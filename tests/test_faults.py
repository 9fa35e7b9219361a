"""Runs that fail safely: a diverging run stops before applying a non-finite step, says so in one line,
keeps its last finite checkpoint and exports nothing; a full (or read-only) disk is one line, leaves no
temporary file and keeps the previous last.ckpt; a run folder holds one run at a time."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import one_line, run_cli

from advpt.errors import DiskFull, FolderInUse
from advpt.files import atomic_path, write_text
from advpt.lock import LOCK_NAME, hold, release
from advpt.training.callbacks import LastCheckpoint, StopOnNonFinite

ADVPT = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "advpt")
QUIET = ["model=vit_micro", "trainer.enable_progress_bar=false"]


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(world_size=1, global_step=7, should_stop=False, precision_plugin=SimpleNamespace())


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training_before_the_step_moves_anything(broken: str) -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    loss = net(torch.randn(3, 4)).square().mean()
    loss.backward()
    if broken == "gradient":
        net.weight.grad[0, 0] = float("inf")
    module = SimpleNamespace(last_loss=torch.tensor(float("nan")) if broken == "loss" else loss.detach())
    before = [p.detach().clone() for p in net.parameters()]
    trainer, stop = _trainer(), StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    assert trainer.should_stop and stop.step == 8
    assert stop.found == ("train/loss is nan" if broken == "loss" else "a gradient is not finite")
    # the step was a no-op: no gradient, momentum or weight decay moved a weight
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_finite_step_is_left_alone() -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(3, 4)).square().mean()
    loss.backward()
    trainer, stop = _trainer(), StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, SimpleNamespace(last_loss=loss.detach()), optimizer)
    assert not trainer.should_stop and stop.found is None
    assert all(p.grad is not None for p in net.parameters())


def test_under_a_grad_scaler_an_overflowing_gradient_is_the_scaler_s_to_skip() -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(3, 4)).sum().backward()
    net.weight.grad[0, 0] = float("inf")
    trainer = _trainer()
    trainer.precision_plugin = SimpleNamespace(scaler=object())
    stop = StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, SimpleNamespace(last_loss=torch.tensor(1.0)), optimizer)
    assert not trainer.should_stop


def _finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "args", "product"),
    [
        ("pretrain", ["monitor=none", "method.base_lr=10000", "trainer.max_steps=40"], "encoder.safetensors"),
        ("finetune", ["pretrained=none", "optim.lr=1e7", "trainer.max_steps=40"], "model.safetensors"),
    ],
)
def test_a_diverging_run_is_one_line_exit_1_keeps_finite_weights_and_exports_nothing(
    command: str, args: list[str], product: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [ADVPT, command, *QUIET, *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"advpt {command}: error:")]
    assert len(errors) == 1 and "training stopped at optimiser step" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (run / product).exists() and not (run / "run.json").exists()
    assert _finite(run / "checkpoints" / "last.ckpt")


# -- a full disk ---------------------------------------------------------------------------------
def _left_behind(folder: Path) -> list[Path]:
    """Temporary or partial files under ``folder`` (ours end in .tmp; Lightning's would too)."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_a_refused_write_is_one_line_naming_the_file_and_the_space_and_keeps_the_previous_file(
    code: int, words: str, tmp_path: Path
) -> None:
    target = write_text(tmp_path / "run.json", "previous\n")
    with pytest.raises(DiskFull) as caught, atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise OSError(code, os.strerror(code))
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: {words} (") and " free on /" in message
    assert "\n" not in message and caught.value.read_only == (code == errno.EROFS)
    assert target.read_text() == "previous\n" and sorted(tmp_path.iterdir()) == [target]


def test_writers_that_name_no_errno_are_read_by_their_words_or_by_the_disk(
    tmp_path: Path, monkeypatch
) -> None:
    from advpt.files import disk_fault

    # safetensors (Rust) words it; torch's zip writer only says "unexpected pos": then the disk decides.
    said = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_fault(said) == errno.ENOSPC
    assert disk_fault(RuntimeError("Error: Read-only file system (os error 30) at path")) == errno.EROFS
    wordless = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert disk_fault(wordless, tmp_path) is None  # this disk has room: not the disk's fault
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda _: os.statvfs_result((*full[:4], 0, *full[5:])))
    assert disk_fault(wordless, tmp_path) == errno.ENOSPC
    assert disk_fault(ValueError("bad value"), tmp_path) is None


def test_a_full_disk_mid_save_keeps_the_previous_last_ckpt(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"step 100")

    def save_checkpoint(path: Path) -> None:
        Path(path).write_bytes(b"step 2")  # part of the new one, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    trainer = SimpleNamespace(
        global_step=200, sanity_checking=False, is_global_zero=True, save_checkpoint=save_checkpoint
    )
    with pytest.raises(DiskFull, match=f"cannot write {last}: no space left on device"):
        LastCheckpoint(last.parent, 100).save(trainer, epochs_done=1)
    assert last.read_bytes() == b"step 100" and list(last.parent.iterdir()) == [last]


def test_a_full_disk_while_metrics_are_saved_keeps_the_rows_saved_before(tmp_path: Path, monkeypatch) -> None:
    from advpt.training.harness import AtomicCSVLogger

    logger = AtomicCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()
    logger.log_metrics({"train/loss": 0.5, "train/images_per_s": 80.0}, step=1)  # a new column: rewritten

    def full(self, rows) -> None:
        self.writer.writerow(dict.fromkeys(self.fieldnames, 0.25))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writerows", full)
    with pytest.raises(DiskFull, match="metrics.csv: no space left on device"):
        logger.save()
    assert (tmp_path / "metrics.csv").read_text() == before and not _left_behind(tmp_path)


def test_a_run_whose_disk_fills_up_is_one_line_exit_74_keeps_last_ckpt_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import lightning as L

    saves = []
    save_checkpoint = L.Trainer.save_checkpoint

    def second_save_fills_the_disk(self, filepath, *args, **kwargs) -> None:
        saves.append(filepath)
        if len(saves) == 2:
            Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
        save_checkpoint(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", second_save_fills_the_disk)
    run = tmp_path / "run"
    args = ["trainer.max_steps=2", "checkpoint_every_n_steps=1", "monitor=none", f"hydra.run.dir={run}"]
    assert run_cli(["pretrain", *QUIET, *args]) == 74
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    last = run / "checkpoints" / "last.ckpt"
    assert len(errors) == 1 and errors[0].startswith("advpt pretrain: error: "), err[-2000:]
    assert f"cannot write {last}: no space left on device (" in errors[0] and " free on /" in errors[0]
    assert f"continue with: advpt pretrain {' '.join(QUIET)}" in errors[0]
    assert errors[0].endswith(f"resume=auto hydra.run.dir={run}") and "Traceback" not in err
    assert torch.load(last, weights_only=True)["global_step"] == 1  # the previous version
    assert not _left_behind(run) and not (run / LOCK_NAME).exists()
    assert not (run / "encoder.safetensors").exists() and not (run / "run.json").exists()


def _tmpfs_allowed(mountpoint: Path) -> bool:
    """Whether this machine lets a user namespace mount a small tmpfs (root, or unprivileged userns)."""
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mountpoint}"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
def test_a_real_full_then_read_only_file_system_is_one_line_each(tmp_path: Path) -> None:
    """On a 900 kB tmpfs vit_micro's first last.ckpt (~520 kB) fits and its second does not."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    copy.mkdir()
    if not _tmpfs_allowed(disk):
        pytest.skip("this machine does not let a test mount a tmpfs")
    run = [ADVPT, "pretrain", *QUIET, "trainer.max_steps=3", "checkpoint_every_n_steps=1", "monitor=none"]
    script = (
        f"mount -t tmpfs -o size=900k tmpfs {disk} && "
        f"{' '.join(run)} hydra.run.dir={disk / 'run'} 2>{tmp_path / 'full.err'}; echo $? > {tmp_path / 'full.rc'}; "
        f"cp -a {disk}/. {copy}/ && mount -o remount,ro {disk} && "
        f"{' '.join(run)} hydra.run.dir={disk / 'other'} 2>{tmp_path / 'ro.err'}; echo $? > {tmp_path / 'ro.rc'}"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, timeout=300, check=True)
    for name, needle in (
        ("full", f"cannot write {disk / 'run' / 'checkpoints' / 'last.ckpt'}: no space left on device ("),
        ("ro", f"cannot write {disk / 'other'}: read-only file system ("),
    ):
        err = (tmp_path / f"{name}.err").read_text()
        errors = [line for line in err.splitlines() if "error:" in line]
        assert (tmp_path / f"{name}.rc").read_text().strip() == "74", err[-2000:]
        assert len(errors) == 1 and errors[0].startswith("advpt pretrain: error: "), err[-2000:]
        assert needle in errors[0] and f"free on {disk})" in errors[0] and "Traceback" not in err
    assert torch.load(copy / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 1
    assert not _left_behind(copy) and not (copy / "other").exists()


# -- one run per folder --------------------------------------------------------------------------
HOLDER = """
import os, sys, time
from advpt.lock import hold
hold(sys.argv[1], "pretrain", ["trainer.max_steps=20", "hydra.run.dir=" + sys.argv[1]])
ready, told = os.pipe()
worker = os.fork() if sys.argv[2] == "fork" else -1  # a data-loader worker, say: it must not keep the lock
if worker == 0:
    os.write(told, b"1")  # the fork's hooks have run in this child: its copy of the lock is closed
    time.sleep(600)
if worker > 0:
    os.read(ready, 1)
print("held", worker, flush=True)
time.sleep(600)
"""


@contextmanager
def held(folder: Path, fork: bool = False) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``, as a run does (with a forked worker if ``fork``); both killed
    at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "fork" if fork else "-"],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = -1
    try:
        assert proc.stdout is not None
        word, worker_pid = proc.stdout.readline().split()
        assert word == "held"
        worker = int(worker_pid)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if worker > 0:
            os.kill(worker, signal.SIGKILL)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with held(tmp_path) as first:
        with pytest.raises(FolderInUse) as refused:
            hold(tmp_path, "pretrain")
        message = str(refused.value)
        assert message.startswith(
            f"{tmp_path} is in use by another run (pid {first.pid} on {socket.gethostname()}"
        )
        assert (
            "started 20" in message
            and f"advpt pretrain trainer.max_steps=20 hydra.run.dir={tmp_path})" in message
        )
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == first.pid  # the refusal wrote nothing
    try:
        hold(tmp_path, "pretrain")  # the first run is over: the folder is free
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        release(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("fork", [False, True], ids=["run", "run-with-a-forked-worker"])
def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path: Path, fork: bool) -> None:
    with held(tmp_path, fork=fork) as first:
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert (tmp_path / LOCK_NAME).is_file()  # its file stays; the kernel dropped its lock
        try:
            hold(tmp_path, "pretrain")
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        finally:
            release(tmp_path)


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"])
def test_the_other_processes_of_a_launch_join_the_run_instead_of_being_refused(
    tmp_path: Path, monkeypatch, variable: str
) -> None:
    with held(tmp_path) as first:
        monkeypatch.setenv(variable, "1")
        hold(tmp_path, "pretrain")  # rank 1 of the same run: no lock of its own, no refusal
        release(tmp_path)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == first.pid


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("pretrain", [*QUIET, "trainer.max_steps=1", "monitor=none"]),
        ("study", ["experiment=smoke", "report=false"]),  # a second study over the first one's folder
    ],
)
def test_a_command_into_a_held_folder_is_one_line_exit_75_and_writes_nothing(
    command: str, args: list[str], tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.csv").write_text("step\n4\n")
    with held(folder) as first:
        assert run_cli([command, *args, f"hydra.run.dir={folder}"]) == 75
        err = capsys.readouterr().err
        one_line(err)
        assert err.startswith(
            f"advpt {command}: error: {folder} is in use by another run (pid {first.pid} on "
        ), err
        assert err.rstrip().endswith(f"give advpt {command} another hydra.run.dir")
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "metrics.csv"]
        assert (folder / "metrics.csv").read_text() == "step\n4\n"


@pytest.mark.slow
def test_two_runs_started_into_one_folder_the_second_refused_the_first_unaffected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [ADVPT, "pretrain", *QUIET, "monitor=none", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        [*args, "trainer.max_steps=200"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (run / LOCK_NAME).is_file():
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        second = subprocess.run(
            [*args, "trainer.max_steps=10"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 75, second.stderr[-2000:]
    one_line(second.stderr)
    assert f"in use by another run (pid {first.pid} on " in second.stderr
    assert "trainer.max_steps=200" in second.stderr  # the holder's command line
    assert first.returncode == 0, err[-2000:]
    with (run / "metrics.csv").open(newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == sorted(steps) and steps[-1] == 199, steps  # one run's rows, in order
    assert json.loads((run / "run.json").read_text())["steps"] == 200
    assert not (run / LOCK_NAME).exists()


def test_a_write_outside_advpt_s_helpers_that_its_disk_refuses_is_one_line_too(tmp_path: Path) -> None:
    from advpt.cli import _user_error

    # shutil.move onto a full disk (Lightning's checkpoint IO): the error names the source, then the target
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/tmpab12", None, str(tmp_path / "x.ckpt"))
    found = _user_error(error, tmp_path)
    assert isinstance(found, DiskFull) and str(found).startswith(
        f"cannot write {tmp_path / 'x.ckpt'}: no space"
    )
    assert _user_error(FileNotFoundError(errno.ENOENT, "gone", "data/x.png"), tmp_path) is None


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import fcntl

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    hold(tmp_path, "pretrain")  # Lustre without -o flock: the run goes on, unprotected, and says so
    release(tmp_path)
    assert "warning: " in capsys.readouterr().err and not (tmp_path / LOCK_NAME).exists()


# -- the rest of the fault table: kill -9 and resume, a truncated checkpoint, a killed study ---------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "advpt.cli", *args]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, "it ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_continues_with_resume_auto_to_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "pretrain",
        "model=vit_micro",
        "monitor=none",
        "trainer.max_steps=80",
        "checkpoint_every_n_steps=5",
    ]
    proc = subprocess.Popen(
        _cli(*args, f"hydra.run.dir={run}"),
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    _wait_for(ckpt.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: whatever was half-written stays so
    proc.wait()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved < 80 and not (run / "run.json").exists()
    done = subprocess.run(
        _cli(*args, f"hydra.run.dir={run}", "resume=auto"), env=ONE_THREAD, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["steps"] == 80
    assert (run / "encoder.safetensors").is_file() and not (run / ".advpt.lock").exists()


def test_a_truncated_last_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = [
        "pretrain",
        "model=vit_micro",
        "monitor=none",
        "checkpoint_every_n_steps=1",
        f"hydra.run.dir={run}",
    ]
    assert run_cli([*args, "trainer.max_steps=2"]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    with ckpt.open("r+b") as f:
        f.truncate(ckpt.stat().st_size // 2)
    capsys.readouterr()
    assert run_cli([*args, "trainer.max_steps=4", "resume=auto"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "is not a readable checkpoint")
    assert "start the run again (resume=null)" in err
    assert ckpt.stat().st_size > 0  # the damaged file is left for the user to look at, not replaced


def _held(lock: Path) -> bool:
    """Whether a live process holds this run folder's lock (a dead one's flock is gone with it)."""
    import fcntl

    if not lock.exists():
        return False
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@pytest.mark.slow
def test_a_study_killed_with_sigkill_stops_its_runs_and_finishes_when_run_again(tmp_path: Path) -> None:
    from helpers import SMALL

    out = tmp_path / "study"
    args = _cli("study", *SMALL, "experiment.scratch.enabled=false", "report=false", f"hydra.run.dir={out}")
    log = tmp_path / "first.log"
    locks = [out / "pretrain" / arm / ".advpt.lock" for arm in ("mae-none-s0", "mae-l2-0.5-s0")]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            args, env=ONE_THREAD, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for(lambda: "pretrain 1/2 done" in log.read_text() and any(map(_held, locks)), proc)
            os.kill(proc.pid, signal.SIGKILL)  # the study alone: its runs learn of it from their parent
            proc.wait()
            deadline = time.monotonic() + 120  # the run it had started stops (SIGTERM: last.ckpt saved)
            while any(map(_held, locks)):
                assert time.monotonic() < deadline, "a run of the killed study is still running"
                time.sleep(0.5)
            # ...stopped, not run to its end, and (SIGTERM) its folder released for the study run again
            assert [lock for lock in locks if not (lock.parent / "run.json").exists()]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    again = subprocess.run(args, env=ONE_THREAD, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "0 runs failed" in again.stdout
    assert all((lock.parent / "encoder.safetensors").is_file() for lock in locks)
    assert len(list((out / "evaluate").glob("*/results.json"))) == 2


def test_a_worker_leaves_its_process_group_before_exiting_whether_it_ends_or_is_preempted(
    tmp_path: Path, monkeypatch
) -> None:
    """A worker that exited with its gloo group alive could hang in interpreter finalisation, and the
    first process waits on its workers: the worker destroys its group on every way out."""
    import torch.distributed as dist

    import advpt.launch as launch
    from advpt.launch import PREEMPTED_EXIT, Preempted

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    seen: list[bool] = []

    def fit(cfg, directory: Path, stop: bool) -> None:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        seen.append(dist.is_initialized())
        if stop:
            raise Preempted(directory, 3)

    for stop in (False, True):
        job = SimpleNamespace(fit=lambda cfg, directory, stop=stop: fit(cfg, directory, stop))
        monkeypatch.setattr(launch.importlib, "import_module", lambda name, job=job: job)
        if stop:
            with pytest.raises(SystemExit) as exited:
                launch._worker("pretrain", str(tmp_path))
            assert exited.value.code == PREEMPTED_EXIT
        else:
            launch._worker("pretrain", str(tmp_path))
        assert seen[-1] and not dist.is_initialized()
    assert seen == [True, True]

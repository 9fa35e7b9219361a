"""Opening a file never runs code: every command given a crafted file refuses it, and the code in it
never runs (each crafted file would create a marker file if it were executed)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import save_file


class _Touch:
    """Unpickling this object (what ``torch.load(weights_only=False)`` does) creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint whose pickle would run code when loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {"encoder.vit.cls_token": torch.zeros(1, 1, 8)},
            "global_step": 1,
            "hyper_parameters": {"model": {"name": "vit_micro"}},
            "payload": _Touch(marker),
        },
        path,
    )
    assert not marker.exists()
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_crafted_checkpoint_would_run_its_code_if_unpickled(tmp_path: Path) -> None:
    # The premise of every test below: the crafted file really does run code under a plain load.
    marker = tmp_path / "marker"
    torch.load(crafted_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pth"])
def test_finetune_refuses_a_crafted_pretrained_checkpoint(suffix: str, tmp_path: Path, capsys) -> None:
    marker, out = tmp_path / "marker", tmp_path / "run"
    evil = crafted_checkpoint(tmp_path / f"evil{suffix}", marker)
    assert run_cli(["finetune", f"pretrained={evil}", f"hydra.run.dir={out}"]) == 2
    err = one_line(capsys)
    assert str(evil) in err and ("refused" in err or "is not a pretrain run" in err)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pth"])
def test_pretrain_refuses_a_crafted_init_checkpoint(suffix: str, tmp_path: Path, capsys) -> None:
    marker, out = tmp_path / "marker", tmp_path / "run"
    evil = crafted_checkpoint(tmp_path / f"evil{suffix}", marker)
    assert run_cli(["pretrain", f"init={evil}", f"hydra.run.dir={out}"]) == 2
    err = one_line(capsys)
    assert f"init={evil}" in err and "Python objects beyond tensors" in err
    assert not marker.exists() and not out.exists()


def test_pretrain_refuses_a_crafted_resume_checkpoint(tmp_path: Path, capsys) -> None:
    marker, out = tmp_path / "marker", tmp_path / "run"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    assert run_cli(["pretrain", f"resume={evil}", f"hydra.run.dir={out}"]) == 2
    err = one_line(capsys)
    assert f"resume={evil}" in err and "Python objects beyond tensors" in err and "Python global" in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_resume_auto_refuses_a_crafted_last_checkpoint_in_the_run_folder(
    command: str, tmp_path: Path, capsys
) -> None:
    marker, out = tmp_path / "marker", tmp_path / "run"
    crafted_checkpoint(out / "checkpoints" / "last.ckpt", marker)
    product = {"pretrain": "encoder.safetensors", "finetune": "model.safetensors"}[command]
    (out / product).write_bytes(b"")  # looks finished: resume=auto reads the checkpoint's progress
    before = sorted(p.name for p in out.iterdir())
    args = [command, "resume=auto", f"hydra.run.dir={out}", *(["pretrained=none"] * (command == "finetune"))]
    assert run_cli(args) == 2
    assert "Python objects beyond tensors" in one_line(capsys)
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_resume_auto_refuses_a_crafted_checkpoint_of_an_unfinished_run(tmp_path: Path, capsys) -> None:
    # No product: the run would resume from last.ckpt, which Lightning must never unpickle.
    marker, out = tmp_path / "marker", tmp_path / "run"
    crafted_checkpoint(out / "checkpoints" / "last.ckpt", marker)
    assert run_cli(["pretrain", "resume=auto", f"hydra.run.dir={out}", "trainer.max_steps=1"]) == 2
    assert "Python objects beyond tensors" in one_line(capsys)
    assert not marker.exists() and not (out / "config.yaml").exists()


def test_visualize_and_evaluate_refuse_a_crafted_checkpoint(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    assert run_cli(["visualize", f"checkpoint={evil}", f"hydra.run.dir={tmp_path / 'vis'}"]) == 2
    assert "Python objects beyond tensors" in one_line(capsys)
    assert run_cli(["evaluate", f"checkpoint={evil}", f"hydra.run.dir={tmp_path / 'ev'}"]) == 2
    one_line(capsys)
    assert not marker.exists() and not (tmp_path / "vis").exists() and not (tmp_path / "ev").exists()


def fine_tuned_folder(folder: Path, data: dict) -> Path:
    """A fine-tuning run folder: a 10-way head and a model.json whose data config is ``data``."""
    folder.mkdir(parents=True)
    save_file(
        {"head.weight": torch.zeros(10, 8), "head.bias": torch.zeros(10)}, str(folder / "model.safetensors")
    )
    spec = {"name": "vit_micro", "kwargs": {"img_size": 32, "patch_size": 8}, "num_classes": 10, "data": data}
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("key", ["root", "info", "val"])
def test_evaluate_refuses_a_program_named_in_model_json(key: str, tmp_path: Path, capsys) -> None:
    # webdataset runs pipe:CMD in a shell; "#" comments out whatever advpt appends (…/info.json).
    marker = tmp_path / "marker"
    command = f"pipe:touch {marker} #"
    data = {"name": "shards", "root": str(tmp_path / "shards"), "batch_size": 8}
    data[key] = command if key != "val" else [command]
    run = fine_tuned_folder(tmp_path / "ft", data)
    assert run_cli(["evaluate", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'ev'}"]) == 2
    err = one_line(capsys)
    assert f"data.{key}=" in err and "only from the command line" in err
    assert not marker.exists() and not (tmp_path / "ev").exists()


def test_a_program_typed_as_data_root_is_still_accepted(tmp_path: Path) -> None:
    # What the user types is trusted: the pipe: root reaches webdataset and runs.
    from advpt.evaluate.suites import data_config

    command = f"pipe:cat {tmp_path}/x.tar"
    spec = {"data": {"name": "shards", "root": "pipe:touch nothing"}}
    assert data_config(spec, command)["root"] == command


def test_shard_info_listing_a_program_or_a_path_is_refused(tmp_path: Path, capsys) -> None:
    from advpt.data.shards import FORMAT, INFO, Located
    from advpt.errors import UserError

    for name in (f"pipe:touch {tmp_path / 'marker'}", "../elsewhere.tar", "/abs/train.tar"):
        info = {
            "format": FORMAT,
            "classes": ["a"],
            "splits": {"train": {"samples": 1, "shards": [{"name": name}]}},
        }
        (tmp_path / INFO).write_text(json.dumps(info))
        with pytest.raises(UserError, match="not a file name beside it"):
            Located({"root": str(tmp_path)})
    assert not (tmp_path / "marker").exists()


def test_report_skips_a_crafted_run_folder_and_never_runs_its_code(tmp_path: Path, capsys) -> None:
    # YAML tags that construct Python objects, in every file the report reads.
    marker = tmp_path / "marker"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    pre, ft, ev = tmp_path / "pre", tmp_path / "ft", tmp_path / "ev"
    for folder in (pre, ft, ev):
        folder.mkdir()
    (pre / "config.yaml").write_text(f"method: {tag}\nattack: {{name: none}}\n")
    (ft / "config.yaml").write_text(f"seed: {tag}\n")
    (ft / "model.json").write_text(json.dumps({"pretrained": str(pre / "encoder.safetensors"), "data": {}}))
    results = {"checkpoint": str(ft / "model.safetensors"), "sets": {"builtin": {"top1": 0.5, "images": 2}}}
    (ev / "results.json").write_text(json.dumps(results))
    run_cli(["report", f"runs=[{tmp_path}]", f"hydra.run.dir={tmp_path / 'report'}"])
    out = capsys.readouterr().out
    assert f"skipped {ev / 'results.json'}" in out and "no evaluation runs found" in out
    assert not marker.exists()


def test_a_crafted_outcomes_file_is_read_as_absent_and_never_runs_its_code(tmp_path: Path) -> None:
    import numpy as np

    from advpt.outcomes import read_outcomes

    marker = tmp_path / "marker"
    path = tmp_path / "outcomes.npz"
    np.savez(
        path,
        builtin=np.array([_Touch(marker)], dtype=object),  # a pickle: would create marker if unpickled
        _keys=np.array(["builtin"]),
        _ids_of=np.array([0]),
        **{"_ids/0": np.array([0]), "_split": np.array("auto|builtin|seed=0")},
    )
    assert read_outcomes(path) is None  # np.load(allow_pickle=False): the report falls back to unpaired
    assert not marker.exists()


@pytest.mark.slow
def test_study_over_a_folder_with_crafted_checkpoints_runs_none_of_them(tmp_path: Path) -> None:
    # A study folder from elsewhere whose pre-training arms stopped half-way: each arm resumes from a
    # crafted last.ckpt, is refused in its own process, and nothing downstream runs.
    from helpers import SMALL

    out, marker = tmp_path / "study", tmp_path / "marker"
    for arm in ("mae-none-s0", "mae-l2-0.5-s0"):
        crafted_checkpoint(out / "pretrain" / arm / "checkpoints" / "last.ckpt", marker)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "advpt.cli",
            "study",
            *SMALL,
            "experiment.scratch.enabled=false",
            "report=false",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode != 0 and "2 runs failed" in done.stdout, done.stdout + done.stderr
    for arm in ("mae-none-s0", "mae-l2-0.5-s0"):
        log = (out / "logs" / "pretrain" / f"{arm}.log").read_text()
        assert "Python objects beyond tensors" in log and "Traceback" not in log
    assert not marker.exists() and not (out / "finetune").exists()


def test_a_model_description_naming_weights_for_timm_to_load_is_refused(tmp_path: Path, capsys) -> None:
    # encoder.json / model.json describe an architecture; a file they name would be opened by timm.
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.pth", marker)
    pre = tmp_path / "pre"
    pre.mkdir()
    save_file({"cls_token": torch.zeros(1, 1, 8)}, str(pre / "encoder.safetensors"))
    kwargs = {"img_size": 16, "patch_size": 4, "checkpoint_path": str(evil)}
    (pre / "encoder.json").write_text(json.dumps({"name": "vit_tiny_patch16_224", "kwargs": kwargs}))
    assert run_cli(["finetune", f"pretrained={pre}", f"hydra.run.dir={tmp_path / 'ft'}"]) == 2
    assert "asks timm to load weights itself (checkpoint_path)" in one_line(capsys)

    run = fine_tuned_folder(tmp_path / "ft2", {"name": "builtin"})
    spec = json.loads((run / "model.json").read_text())
    spec["kwargs"]["checkpoint_path"] = str(evil)
    (run / "model.json").write_text(json.dumps(spec))
    assert run_cli(["evaluate", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'ev'}"]) == 2
    assert "asks timm to load weights itself (checkpoint_path)" in one_line(capsys)
    assert not marker.exists() and not (tmp_path / "ft").exists() and not (tmp_path / "ev").exists()

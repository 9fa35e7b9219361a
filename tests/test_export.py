"""``advpt export``: a fine-tuned model as a program that runs in a Python without advpt or timm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_cli

QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
SMALL = ["model=vit_micro", "model.img_size=32"]  # 32 px, as RobustBench's CIFAR-10 images


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 1-step adversarial pretrain run (linf 2/255), a 2-step fine-tuning of it, and its export."""
    root = tmp_path_factory.mktemp("export")
    pretrain, finetune, out = root / "pretrain", root / "finetune", root / "exported"
    args = ["pretrain", *SMALL, "attack=linf", "eps=2/255", "trainer.max_steps=1", *QUIET]
    assert run_cli([*args, f"hydra.run.dir={pretrain}"]) == 0
    args = ["finetune", f"pretrained={pretrain}", "trainer.max_steps=2", *QUIET]
    assert run_cli([*args, f"hydra.run.dir={finetune}"]) == 0
    assert run_cli(["export", f"checkpoint={finetune}", f"out={out}", f"hydra.run.dir={root / 'run'}"]) == 0
    return {"pretrain": pretrain, "finetune": finetune, "out": out}


def advpt_logits(finetune: Path, x: torch.Tensor) -> torch.Tensor:
    """The fine-tuned model's logits as ``advpt evaluate`` computes them (its own loader)."""
    from advpt.evaluate import load_classifier, read_spec, resolve_checkpoint

    weights = resolve_checkpoint(finetune)
    with torch.no_grad():
        return load_classifier(weights, read_spec(weights))(x)


# Loads the program where advpt and timm cannot even be imported, runs it, saves the logits.
ISOLATED = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("advpt", "timm"):
            raise ImportError("the exported program must not need " + name)

sys.meta_path.insert(0, Refuse())
import torch

program, images, logits = sys.argv[1:4]
model = torch.export.load(program).module()
torch.save(model(torch.load(images, weights_only=True)), logits)
for batch in (1, 5):
    assert model(torch.rand(batch, 3, 32, 32)).shape == (batch, 10)
assert "advpt" not in sys.modules and "timm" not in sys.modules, sorted(sys.modules)
print("RAN")
"""


def test_the_program_runs_without_advpt_or_timm_and_gives_the_fine_tuned_logits(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "images.pt")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the finder above refuses advpt and timm
    args = [sys.executable, "-I", "-c", ISOLATED, str(runs["out"] / "model.pt2")]
    done = subprocess.run(
        [*args, str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "RAN" in done.stdout, done.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, advpt_logits(runs["finetune"], x), rtol=1e-5, atol=1e-5)


def test_the_program_reads_pixels_in_0_1_and_normalises_inside(runs: dict[str, Path]) -> None:
    from advpt.evaluate import load_classifier, read_spec, resolve_checkpoint
    from advpt.models import IMAGENET_MEAN, IMAGENET_STD

    info = json.loads((runs["out"] / "model.json").read_text())
    assert (info["mean"], info["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    weights = resolve_checkpoint(runs["finetune"])
    vit = load_classifier(weights, read_spec(weights)).vit  # the bare timm ViT: no normalisation
    program = torch.export.load(str(runs["out"] / "model.pt2")).module()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    logits = program(x)
    torch.testing.assert_close(logits, vit((x - mean) / std), rtol=1e-5, atol=1e-5)
    assert "device" not in program.code  # nothing pins a device: .to(device) moves all of it
    logits.logsumexp(1).sum().backward()  # attackable: the gradient reaches the pixels
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_autoattack_runs_on_the_program_as_the_readme_hands_it_to_robustbench(runs: dict[str, Path]) -> None:
    autoattack = pytest.importorskip("pyautoattack")  # the authors' AutoAttack, which RobustBench runs
    model = torch.export.load(str(runs["out"] / "model.pt2")).module()
    with pytest.raises(NotImplementedError):
        model.eval()  # an exported program refuses it: the README sets the flag instead
    model.training = False
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    adversary = autoattack.AutoAttack(model, norm="Linf", eps=8 / 255, version="custom", attacks=["apgd-ce"])
    adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, 2
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=4)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_model_json_says_what_the_program_is_and_where_it_comes_from(runs: dict[str, Path]) -> None:
    info = json.loads((runs["out"] / "model.json").read_text())
    assert sorted(p.name for p in runs["out"].iterdir()) == ["model.json", "model.pt2"]
    assert (info["file"], info["format"]) == ("model.pt2", "torch.export")
    assert info["load"] == "torch.export.load('model.pt2').module()"
    assert info["classes"] == [str(i) for i in range(10)]  # the built-in digits name theirs
    assert (info["num_classes"], info["image_size"]) == (10, 32)
    assert info["input"] == {
        "shape": ["batch", 3, 32, 32],
        "dtype": "float32",
        "range": [0, 1],
        "min_batch": 1,
    }
    finetune, pretrained = info["lineage"]["finetune"], info["lineage"]["pretrained"]
    assert finetune["run"] == str(runs["finetune"].resolve()) and finetune["steps"] == 2
    assert (finetune["data"], finetune["optim"]) == ("builtin", "adamw_lld")
    assert pretrained["run"] == str(runs["pretrain"].resolve())
    assert (pretrained["method"], pretrained["attack"], pretrained["steps"]) == ("mae", "linf", 1)
    assert pretrained["eps"] == pytest.approx(2 / 255)


def test_published_or_unknown_encoders_are_recorded_by_their_source_only(tmp_path: Path) -> None:
    from advpt.export import _pretrain_lineage

    weights = tmp_path / "downloads" / "mae_pretrain_vit_base.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    (tmp_path / "downloads" / "config.yaml").write_text("method: {name: byol}\n")  # not a pretrain run's
    for source in ("timm:vit_base_patch16_224.mae", str(weights), "https://example.org/w.pth"):
        assert _pretrain_lineage(source) == {"source": source}
    assert _pretrain_lineage(None) == _pretrain_lineage("none") == {"source": "none"}


def test_class_names_come_from_the_dataset_or_are_indices(tmp_path: Path) -> None:
    from advpt.export import class_names

    for name in ("cat", "dog", "ant"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert class_names({"name": "imagefolder", "root": str(tmp_path)}, 3) == ["ant", "cat", "dog"]
    assert class_names({"name": "imagefolder", "root": str(tmp_path)}, 4) == [0, 1, 2, 3]
    assert class_names({"name": "cifar10"}, 10)[:2] == ["airplane", "automobile"]
    assert class_names({"name": "cifar100", "root": "/nowhere"}, 100) == list(range(100))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates TorchScript
def test_where_torch_export_fails_it_writes_torchscript_and_says_so(
    runs: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot export this\nsecond line")

    monkeypatch.setattr(torch.export, "export", refuse)
    out = tmp_path / "ts"
    assert (
        run_cli(
            ["export", f"checkpoint={runs['finetune']}", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
        )
        == 0
    )
    err = capsys.readouterr().err
    one_line(err)
    assert err.startswith("advpt export: warning: torch.export cannot export"), err
    assert "RuntimeError: cannot export this)" in err and "model.ts" in err
    info = json.loads((out / "model.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]
    assert (info["file"], info["format"]) == ("model.ts", "torchscript")
    program = torch.jit.load(str(out / "model.ts"))
    for batch in (1, 3):
        x = torch.rand(batch, 3, 32, 32)
        torch.testing.assert_close(program(x), advpt_logits(runs["finetune"], x), rtol=1e-5, atol=1e-5)


def test_a_failed_export_leaves_nothing(runs: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(torch.jit, "trace", refuse)
    run = tmp_path / "run"
    out = tmp_path / "new" / "exported"
    assert run_cli(["export", f"checkpoint={runs['finetune']}", f"out={out}", f"hydra.run.dir={run}"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "cannot export the model: torch.export failed")
    assert list(tmp_path.iterdir()) == []  # neither out= (nor its new parent) nor the run directory


@pytest.mark.parametrize(
    "args,needle",
    [
        (["checkpoint=/no/such/run"], "checkpoint=/no/such/run does not exist"),
        (["checkpoint=PRETRAIN"], "is a pre-trained encoder without a classifier head; fine-tune it first"),
        (["out=FULL"], "is not empty: give a new or empty folder"),
        (["out=FILE"], "exists and is not a folder"),
        (["out=FILE/sub"], "cannot be created: "),
        (["checkpoint=latest"], "checkpoint=latest found no finished `advpt finetune` run"),
        (["foo=1"], "unknown key 'foo'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args: list[str], needle: str, runs: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    monkeypatch.chdir(cwd)
    given = {"PRETRAIN": runs["pretrain"], "FULL": tmp_path / "full", "FILE": tmp_path / "file"}
    for key, path in given.items():
        args = [a.replace(key, str(path)) for a in args]
    if not any(a.startswith("checkpoint=") for a in args):
        args = [f"checkpoint={runs['finetune']}", *args]
    assert run_cli(["export", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "export", needle)
    assert list(cwd.iterdir()) == []
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_help_shows_the_config(capsys) -> None:
    assert run_cli(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: advpt export ") and "checkpoint: latest" in out and "out: null" in out

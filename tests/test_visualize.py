"""``advpt visualize``: checkpoints of every kind found and titled, one PNG with a panel each, bad paths exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_cli
from PIL import Image

from advpt.visualize import draw, patch_weight, resolve, title

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MICRO = {"img_size": 16, "patch_size": 4, "global_pool": "avg", "embed_dim": 32, "depth": 2, "num_heads": 2}


def vit_state(num_classes: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **MICRO)
    return {k: v.contiguous() for k, v in vit.state_dict().items()}


def pretrain_run(
    directory: Path, method: str = "mae", attack: str = "linf", eps: float = 4 / 255, seed: int = 0
):
    """A pre-training run directory: encoder.safetensors + encoder.json + config.yaml + checkpoints/last.ckpt."""
    from safetensors.torch import save_file

    state = vit_state(seed=seed)
    (directory / "checkpoints").mkdir(parents=True)
    save_file(state, str(directory / "encoder.safetensors"))
    (directory / "encoder.json").write_text(
        json.dumps({"name": "vit_tiny_patch16_224", "kwargs": MICRO, "method": method})
    )
    (directory / "config.yaml").write_text(
        f"method:\n  name: {method}\nattack:\n  name: {attack}\n  steps: 2\neps: {eps}\nmodel:\n  img_size: 16\n"
    )
    # Lightning layout: the trained encoder under encoder.vit., BYOL's EMA copy under target.encoder.vit.
    lightning = {f"encoder.vit.{k}": v for k, v in state.items()}
    lightning |= {f"target.encoder.vit.{k}": torch.zeros_like(v) for k, v in state.items()}
    torch.save({"state_dict": lightning, "global_step": 1}, directory / "checkpoints" / "last.ckpt")
    return directory


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        return im.size


def test_every_checkpoint_kind_gives_the_same_filters(tmp_path: Path) -> None:
    run = pretrain_run(tmp_path / "run")
    expected = vit_state()["patch_embed.proj.weight"]
    assert resolve(run) == run / "encoder.safetensors"
    for path in (run / "encoder.safetensors", run / "checkpoints" / "last.ckpt"):
        assert torch.equal(patch_weight(path), expected), path  # .ckpt: encoder.vit., not the EMA target
    (run / "encoder.safetensors").unlink()
    assert resolve(run) == run / "checkpoints" / "last.ckpt"


def test_titles_from_config_else_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    assert title(pretrain_run(tmp_path / "a") / "encoder.safetensors") == "mae linf 4/255"
    assert (
        title(pretrain_run(tmp_path / "b", "byol", "l2", 0.5) / "checkpoints" / "last.ckpt") == "byol l2 0.5"
    )
    assert (
        title(pretrain_run(tmp_path / "c", "rotnet", "none", 0) / "encoder.safetensors") == "rotnet nominal"
    )
    lone = tmp_path / "weights" / "model.safetensors"
    lone.parent.mkdir()
    save_file(vit_state(num_classes=10), str(lone))
    assert title(lone) == "weights"
    (lone.parent / "model.json").write_text(json.dumps({"layer_decay": 0.65, "pretrained": "none"}))
    assert title(lone) == "scratch fine-tuned ld=0.65"
    # A fine-tuned model is named after its pre-training run, whichever file of it is given.
    spec = {"layer_decay": 0.75, "pretrained": str(tmp_path / "b" / "encoder.safetensors")}
    (lone.parent / "model.json").write_text(json.dumps(spec))
    assert title(lone) == "byol l2 0.5 fine-tuned ld=0.75"
    (lone.parent / "checkpoints").mkdir()
    assert title(lone.parent / "checkpoints" / "last.ckpt") == "byol l2 0.5 fine-tuned ld=0.75"


def test_panels_side_by_side_widen_the_figure(tmp_path: Path) -> None:
    a = pretrain_run(tmp_path / "a") / "encoder.safetensors"
    b = pretrain_run(tmp_path / "b", "byol", "l2", 0.5, seed=1) / "encoder.safetensors"
    one = png_size(draw([a], tmp_path / "one.png"))
    two = png_size(draw([a, b], tmp_path / "two.png"))
    assert two[0] > 1.8 * one[0] and two[1] == one[1]


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_draws_latest_and_a_list(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    old = pretrain_run(tmp_path / "outputs" / "pretrain" / "mae-linf" / "old")
    new = pretrain_run(tmp_path / "outputs" / "pretrain" / "byol-l2" / "new", "byol", "l2", 0.5, seed=1)
    stamp = (old / "encoder.safetensors").stat().st_mtime
    os.utime(old / "encoder.safetensors", (stamp - 100, stamp - 100))

    assert run_cli(["visualize", "hydra.run.dir=one"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "advpt visualize: filters of 1 panel in one/filters.png"
    single = png_size(tmp_path / "one" / "filters.png")
    reference = draw([new / "encoder.safetensors"], tmp_path / "reference.png")  # latest = the newest run
    assert (tmp_path / "one" / "filters.png").read_bytes() == reference.read_bytes()

    both = f"checkpoint=[{old},{old}/checkpoints/last.ckpt,outputs/pretrain/byol-l2/new]"
    assert run_cli(["visualize", both, "components=10", "hydra.run.dir=three"]) == 0
    assert png_size(tmp_path / "three" / "filters.png")[0] > 2.5 * single[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["checkpoint=/no/such.safetensors"], "checkpoint=/no/such.safetensors does not exist"),
        (["checkpoint=[{run},/no/such]"], "checkpoint=/no/such does not exist"),
        (["checkpoint={run}/config.yaml"], "is not a weights file"),
        (["checkpoint={empty}"], "holds none of encoder.safetensors, model.safetensors"),
        (["checkpoint={junk}"], "is not a readable checkpoint"),
        (["checkpoint={nopatch}"], "no key ending in 'patch_embed.proj.weight'"),
        (["checkpoint={run}", "components=0"], "components=0 is invalid"),
        ([], "run advpt pretrain first or pass checkpoint=PATH"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needle, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    run = pretrain_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp_path / "nopatch.safetensors"))
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    paths = {"run": run, "empty": tmp_path / "empty", "junk": tmp_path / "junk.ckpt"}
    args = [a.format(**paths, nopatch=tmp_path / "nopatch.safetensors") for a in args]
    assert run_cli(["visualize", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "visualize", needle)
    assert sorted(tmp_path.rglob("*")) == before

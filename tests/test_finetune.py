"""Fine-tuning: layer-decay groups, the two schedules, where weights come from, and the command's outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import load, one_line, run_cli
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from advpt.config import compose
from advpt.errors import UserError
from advpt.finetune import (
    FineTuner,
    build_optimizer,
    build_scheduler,
    check,
    load_backbone,
    load_encoder_state,
    resolve_pretrained,
    train_transform,
)

FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
MODEL_JSON_KEYS = {"name", "kwargs", "data", "num_classes", "pretrained", "layer_decay", "optim"}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """One `advpt pretrain` run of vit_micro (1 step): run dir with encoder.* and checkpoints/last.ckpt."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    args = ["pretrain", "model=vit_micro", "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    assert run_cli([*args, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def micro_model(depth: int = 2) -> dict:
    model = load("model", "vit_micro")
    model["kwargs"] = {**model["kwargs"], "depth": depth}
    return model


def with_trainer(module: FineTuner, total_steps: int) -> FineTuner:
    module._trainer = SimpleNamespace(
        accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=total_steps
    )
    return module


# -- layer-wise lr decay ----------------------------------------------------------------------------
def expected_scale_power(name: str, depth: int) -> int:
    """k in γ^k: the head and fc_norm 0, block i depth-i, the embeddings and class token depth+1."""
    if name.startswith(("head.", "fc_norm.")):
        return 0
    if name.startswith("blocks."):
        return depth - int(name.split(".")[1])
    assert name.startswith(("patch_embed.", "pos_embed", "cls_token")), name
    return depth + 1


@pytest.mark.parametrize("depth", [2, 4])
def test_layer_decay_groups_block_by_block(depth: int) -> None:
    gamma = 0.75
    module = with_trainer(FineTuner(micro_model(depth), load("optim", "adamw_lld"), 10, gamma, 512), 100)
    optimizer = module.configure_optimizers()["optimizer"]
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = group
    names = dict(module.vit.named_parameters())
    assert set(group_of) == {id(p) for p in module.parameters()}  # every parameter, once
    for name, p in names.items():
        group = group_of[id(p)]
        assert group["lr_scale"] == pytest.approx(gamma ** expected_scale_power(name, depth)), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name

    def scale(name: str) -> float:
        return group_of[id(names[name])]["lr_scale"]

    top = depth - 1
    assert scale(f"blocks.{top}.attn.qkv.weight") == pytest.approx(gamma)
    assert group_of[id(names[f"blocks.{top}.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert scale("blocks.0.norm1.bias") == pytest.approx(gamma**depth)
    assert group_of[id(names["blocks.0.norm1.bias"])]["weight_decay"] == 0.0
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        assert scale(name) == pytest.approx(gamma ** (depth + 1)), name
    for name in ("cls_token", "pos_embed"):
        assert group_of[id(names[name])]["weight_decay"] == 0.0
    for name in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        assert scale(name) == 1.0, name

    # The scheduler multiplies the scale in exactly once: after warm-up, lr = peak * γ^k.
    scheduler = build_scheduler(optimizer, load("optim", "adamw_lld"), 100)
    scheduler.step_update(5)
    peak = module.lr
    for name, p in names.items():
        assert group_of[id(p)]["lr"] == pytest.approx(peak * gamma ** expected_scale_power(name, depth)), name


def test_layer_decay_one_is_plain_fine_tuning() -> None:
    vit = FineTuner(micro_model(), load("optim", "adamw_lld"), 10, 1.0).vit
    optimizer = build_optimizer(vit, load("optim", "adamw_lld"), lr=1e-3, layer_decay=1.0)
    assert {g["lr_scale"] for g in optimizer.param_groups} == {1.0}


# -- schedules ---------------------------------------------------------------------------------------
def lr_curve(optim: dict, total: int, lr: float, steps: list[int]) -> list[float]:
    vit = FineTuner(micro_model(), optim, 10, 1.0).vit
    optimizer = build_optimizer(vit, optim, lr=lr, layer_decay=1.0)
    scheduler = build_scheduler(optimizer, optim, total)
    out = []
    for t in steps:
        scheduler.step_update(t)
        out.append(max(g["lr"] for g in optimizer.param_groups))
    return out


def test_transfer_schedule_warms_up_for_500_of_2500_steps_then_cosine_to_zero() -> None:
    optim = load("optim", "sgd_transfer")
    # lr(t) = 0.01 * t / 500 during warm-up (the update at step 0 uses lr 0, as in big_vision); the
    # cosine then spans the 2000 steps after it: lr(1500) is its midpoint, lr(2500) its end.
    lrs = lr_curve(optim, 2500, 0.01, [0, 250, 499, 500, 1500, 2499, 2500])
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(0.005)
    assert lrs[2] == pytest.approx(0.01 * 499 / 500)
    assert lrs[3] == pytest.approx(0.01)
    assert lrs[4] == pytest.approx(0.005)
    assert lrs[5] == pytest.approx(0.005 * (1 + math.cos(math.pi * 1999 / 2000)))
    assert lrs[6] == pytest.approx(0.0, abs=1e-12)


def test_transfer_optimizer_is_sgd_momentum_without_decay_or_layer_scales() -> None:
    optim = load("optim", "sgd_transfer")
    module = with_trainer(FineTuner(micro_model(), optim, 10, 1.0, 512), 2500)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9 and not group["nesterov"] and group["weight_decay"] == 0.0
        assert group.get("lr_scale", 1.0) == 1.0
    assert module.lr == pytest.approx(0.01)  # quoted at batch 512
    assert FineTuner(micro_model(), optim, 10, 1.0, 64).lr == pytest.approx(0.01 * 64 / 512)


def test_adamw_schedule_warms_up_then_decays_to_min_lr() -> None:
    optim = load("optim", "adamw_lld")
    steps = [0, 1, 2, 4, 5, 25, 50, 75, 99, 100]
    lrs = dict(zip(steps, lr_curve(optim, 100, 5e-4, steps), strict=True))  # warm-up: 5 of 100 steps
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-4) and lrs[4] == pytest.approx(4e-4)
    assert lrs[5] == pytest.approx(5e-4)
    decay = [lrs[t] for t in (5, 25, 50, 75, 99, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[100] == pytest.approx(optim["min_lr"])


# -- augmentation -------------------------------------------------------------------------------------
def test_randaugment_pipeline_keeps_small_images_in_unit_range() -> None:
    optim = load("optim", "adamw_lld")
    transform = train_transform(optim, 16)
    randaugment = next(t for t in transform.transforms[1].transforms if hasattr(t, "ops"))
    for op in randaugment.ops:  # strongest magnitude, every time: timm's posterize keeps 0 bits there
        op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
    image = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    for _ in range(30):
        x = transform(image)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_transfer_pipeline_resizes_ignoring_aspect_ratio() -> None:
    x = train_transform(load("optim", "sgd_transfer"), 16)((torch.rand(3, 8, 24) * 255).to(torch.uint8))
    assert x.shape == (3, 16, 16) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


# -- where the weights come from -----------------------------------------------------------------------
def test_run_dir_encoder_file_and_checkpoint_give_the_same_backbone(pretrain_run: Path) -> None:
    sources = [pretrain_run, pretrain_run / "encoder.safetensors", pretrain_run / "checkpoints" / "last.ckpt"]
    resolved = [resolve_pretrained(str(s)) for s in sources]
    assert resolved[0].path == (pretrain_run / "encoder.safetensors").resolve()
    micro = load("model", "vit_micro")
    for r in resolved:
        assert r.model == {k: micro[k] for k in ("name", "img_size", "patch_size", "kwargs")}

    encoder = load_file(pretrain_run / "encoder.safetensors")
    for r in resolved:
        state = load_encoder_state(r.path)
        assert state.keys() == encoder.keys()
        module = FineTuner(r.model, load("optim", "adamw_lld"), 10, 0.75)
        load_backbone(module.vit, state)
        weights = module.vit.state_dict()
        for k, v in encoder.items():
            assert torch.equal(weights[k], v), k
        head = module.vit.head.requires_grad_(False)
        assert head.weight.shape == (10, 32) and float(head.weight.std()) < 1e-4  # fresh, MAE's std 2e-5
        assert float(head.weight.abs().max()) > 0 and torch.count_nonzero(head.bias) == 0


def test_a_backbone_that_does_not_fit_is_refused() -> None:
    module = FineTuner(micro_model(), load("optim", "adamw_lld"), 10, 0.75)
    deeper = FineTuner(micro_model(depth=3), load("optim", "adamw_lld"), 10, 0.75).vit.state_dict()
    with pytest.raises(UserError, match="blocks.2"):
        load_backbone(module.vit, deeper)


def test_pretrained_none_uses_the_model_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = check(compose("finetune", ["pretrained=none", "model=vit_micro"]), touch_data=False)
    assert cfg.pretrained == "none" and cfg.model.name == "vit_tiny_patch16_224" and cfg.model.img_size == 16
    cfg = check(compose("finetune", ["pretrained=none"]), touch_data=False)  # pretrain's default model
    assert cfg.model.img_size == 32 and cfg.model.patch_size == 8


def test_latest_is_the_newest_encoder_here(pretrain_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run advpt pretrain first"):
        resolve_pretrained("latest")
    for age, name in ((100, "new"), (200, "old")):  # created in this order, but "new" was written last
        run = shutil.copytree(pretrain_run, tmp_path / "outputs" / "pretrain" / "mae-l2" / name)
        stamp = time.time() - age
        os.utime(run / "encoder.safetensors", (stamp, stamp))
    cfg = check(compose("finetune", []), touch_data=False)
    assert cfg.pretrained == str((tmp_path / "outputs/pretrain/mae-l2/new/encoder.safetensors").resolve())
    assert cfg.model.img_size == 16 and cfg.layer_decay == 0.85  # the cpu recipe's


@pytest.fixture
def bad_files(pretrain_run: Path, tmp_path: Path) -> Path:
    files = tmp_path / "files"
    (files / "empty").mkdir(parents=True)
    (files / "notes.txt").write_text("hello")
    (files / "garbage.ckpt").write_text("not a checkpoint")
    torch.save(
        {"state_dict": {"net.vit.cls_token": torch.zeros(1)}, "hyper_parameters": {}}, files / "other.ckpt"
    )
    (files / "lonely").mkdir()
    shutil.copy(pretrain_run / "encoder.safetensors", files / "lonely" / "encoder.safetensors")
    (files / "mismatch").mkdir()
    shutil.copy(pretrain_run / "encoder.safetensors", files / "mismatch" / "encoder.safetensors")
    spec = json.loads((pretrain_run / "encoder.json").read_text())
    spec["kwargs"]["depth"] = 3
    (files / "mismatch" / "encoder.json").write_text(json.dumps(spec))
    save_file({"x": torch.zeros(2)}, str(files / "not_vit.safetensors"))
    shutil.copy(pretrain_run / "encoder.json", files / "encoder.json")
    return files


@pytest.mark.parametrize(
    "args,needle",
    [
        (["pretrained=/no/such/run"], "pretrained=/no/such/run does not exist"),
        (["pretrained=FILES/notes.txt"], "is not a pretrain run directory, an encoder .safetensors"),
        (["pretrained=FILES/empty"], "is a folder without encoder.safetensors or checkpoints/last.ckpt"),
        (["pretrained=FILES/lonely/encoder.safetensors"], "has no encoder.json beside it"),
        (["pretrained=FILES/garbage.ckpt"], "is not a readable checkpoint"),
        (["pretrained=FILES/other.ckpt"], "is not a checkpoint of `advpt pretrain`"),
        (["pretrained=FILES/mismatch"], "does not fit its model vit_tiny_patch16_224 (missing blocks.2"),
        (["pretrained=FILES/not_vit.safetensors"], "does not fit its model"),
        (
            [],
            "pretrained=latest found no finished `advpt pretrain` run under outputs/pretrain/ or multirun/pretrain/",
        ),
        (["pretrained=RUN", "model=vit_tiny_patch4_32"], "is not the architecture of pretrained="),
        (["pretrained=none", "layer_decay=0"], "layer_decay=0 is out of range: use 0 < γ <= 1"),
        (["pretrained=none", "layer_decay=1.5"], "layer_decay=1.5 is out of range"),
        (["pretrained=none", "layer_decay=abc"], "layer_decay='abc' is not a number"),
        (
            ["pretrained=none", "optim=foo"],
            "unknown optim option 'foo'; choose one of: adamw_lld, linear_probe, sgd_transfer",
        ),
        (
            ["pretrained=none", "optim=sgd_transfer", "layer_decay=0.65"],
            "does not apply to optim=sgd_transfer",
        ),
        (["pretrained=none", "optim.warmup_fraction=1.5"], "optim.warmup_fraction=1.5 is out of range"),
        (["pretrained=none", "-m", "layer_decay=0.65,1.5"], "layer_decay=1.5 is out of range"),
        (["pretrained=none", "resume=/no/such.ckpt"], "resume=/no/such.ckpt is not a checkpoint"),
        (["pretrained=none", "optim.lr=0"], "optim.lr=0 is out of range: expected a number > 0"),
        (["pretrained=none", "optim.betas=[0.9,1]"], "optim.betas=[0.9,1] is out of range"),
        (["pretrained=none", "optim.label_smoothing=1"], "optim.label_smoothing=1 is out of range"),
        (
            ["pretrained=none", "optim.re_prob=1.5"],
            "optim.re_prob=1.5 is out of range: expected a number in [0, 1]",
        ),
        (["pretrained=none", "optim.scale=[0,1]"], "optim.scale=[0,1] is out of range"),
        (
            ["pretrained=none", "optim=sgd_transfer", "optim.momentum=-0.9"],
            "optim.momentum=-0.9 is out of range",
        ),
        (["pretrained=none", "optim.mixup=-1"], "optim.mixup=-1 is out of range"),
        (["pretrained=none", "trainer.max_epochs=0"], "trainer.max_epochs=0 is invalid"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args, needle, bad_files: Path, pretrain_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = [a.replace("FILES", str(bad_files)).replace("RUN", str(pretrain_run)) for a in args]
    assert run_cli(["finetune", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "finetune", needle)
    assert list(cwd.iterdir()) == []


def test_model_json_records_one_layer_decay(tmp_path: Path, monkeypatch) -> None:
    from advpt.finetune import export_classifier

    monkeypatch.chdir(tmp_path)
    cfg = check(
        compose("finetune", ["pretrained=none", "model=vit_micro", "layer_decay=0.65"]), touch_data=False
    )
    module = FineTuner(
        OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.optim), 10, cfg.layer_decay
    )
    export_classifier(module, cfg, tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["layer_decay"] == 0.65 and "layer_decay" not in spec["optim"]
    assert json.dumps(spec).count("layer_decay") == 1
    assert "layer_decay" not in cfg.optim  # config.yaml says it once too


# -- the command ----------------------------------------------------------------------------------------
def check_outputs(run_dir: Path) -> tuple[dict, dict]:
    import csv

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    spec = json.loads((run_dir / "model.json").read_text())
    assert set(spec) == MODEL_JSON_KEYS
    vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    vit.load_state_dict(load_file(run_dir / "model.safetensors"))  # strict, head included
    assert spec["kwargs"]["num_classes"] == spec["num_classes"] == 10 and spec["data"]["name"] == "builtin"

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert (
        cfg["num_classes"] == 10
        and cfg["model"]["img_size"] == 16
        and cfg["pretrained"] == spec["pretrained"]
    )
    assert cfg["layer_decay"] == spec["layer_decay"] and cfg["optim"] == spec["optim"]

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1"} <= set(rows[0])
    top1 = [float(r["val/top1"]) for r in rows if r["val/top1"]]
    assert len(top1) == 1 and 0.0 <= top1[0] <= 1.0  # the final weights, scored on the digits' test split
    return spec, cfg


@pytest.mark.slow
def test_default_run_fine_tunes_the_latest_pretrain_run(
    pretrain_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pretrain_run, tmp_path / "outputs" / "pretrain" / "mae-l2" / "run")
    capsys.readouterr()
    assert run_cli(["finetune", "trainer.max_steps=2", *FAST]) == 0
    (run_dir,) = (tmp_path / "outputs" / "finetune" / "adamw_lld").iterdir()
    spec, cfg = check_outputs(run_dir)
    assert spec["pretrained"] == str((tmp_path / "outputs/pretrain/mae-l2/run/encoder.safetensors").resolve())
    assert spec["layer_decay"] == 0.85 and spec["optim"]["name"] == "adamw_lld"
    out = capsys.readouterr().out  # which encoder, then the summary: steps, val top-1, run, next command
    assert "advpt finetune: loaded encoder outputs/pretrain/mae-l2/run/encoder.safetensors" in out
    summary = out.strip().splitlines()[-3:]
    assert summary[0].startswith("advpt finetune: 2 steps, val top-1 ") and summary[0].endswith(" %")
    rel = run_dir.relative_to(tmp_path)
    assert summary[1:] == [f"  run:  {rel}", f"  next: advpt evaluate checkpoint={rel}"]
    assert cfg["trainer"]["gradient_clip_val"] is None


@pytest.mark.slow
def test_transfer_run_from_a_checkpoint(pretrain_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = pretrain_run / "checkpoints" / "last.ckpt"
    args = ["finetune", "optim=sgd_transfer", f"pretrained={ckpt}", "trainer.max_steps=2", *FAST]
    assert run_cli([*args, f"hydra.run.dir={run_dir}"]) == 0
    spec, cfg = check_outputs(run_dir)
    assert spec["pretrained"] == str(ckpt.resolve()) and spec["layer_decay"] == 1.0
    assert spec["optim"]["name"] == "sgd_transfer" and cfg["trainer"]["gradient_clip_val"] == 1.0


@pytest.mark.slow
def test_multirun_layer_decay_sweep_as_written(pretrain_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "finetune",
        "-m",
        "layer_decay=0.65,0.75",
        f"pretrained={pretrain_run}",
        "trainer.max_steps=1",
        *FAST,
    ]
    assert run_cli(args) == 0
    specs = sorted(tmp_path.glob("multirun/finetune/**/model.json"))
    assert len(specs) == 2
    seen = {json.loads(s.read_text())["layer_decay"] for s in specs}
    assert seen == {0.65, 0.75}
    for s in specs:
        assert (
            OmegaConf.load(s.with_name("config.yaml")).layer_decay == json.loads(s.read_text())["layer_decay"]
        )

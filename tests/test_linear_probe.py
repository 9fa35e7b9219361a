"""MAE's linear probe (optim=linear_probe): a frozen encoder, BatchNorm + linear head, LARS, a plain export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from helpers import load, one_line, run_cli
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from advpt.config import compose
from advpt.finetune import FineTuner, build_scheduler, check, export_classifier, train_transform

FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
HEAD = ("head.1.weight", "head.1.bias")  # what trains: the norm has no parameters (affine=False)


def probe_optim(**overrides) -> dict:
    return {**load("optim", "linear_probe"), **overrides}


def with_trainer(module: FineTuner, total_steps: int) -> FineTuner:
    module._trainer = SimpleNamespace(
        accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=total_steps
    )
    return module


def encoder_state(module: FineTuner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.vit.state_dict().items() if not k.startswith("head.")}


# -- the frozen encoder ----------------------------------------------------------------------------------
def test_only_the_head_trains_and_the_encoder_stays_in_eval_mode() -> None:
    # drop path on: an encoder left in training mode would give two different features of one image
    module = FineTuner(load("model", "vit_micro"), probe_optim(drop_path_rate=0.5), 10, batch_size=8)
    module.train()
    trainable = {name for name, p in module.vit.named_parameters() if p.requires_grad}
    assert trainable == set(HEAD)
    head = module.vit.head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    assert head[0].training and head[1].training
    assert not any(m.training for name, m in module.vit.named_modules() if not name.startswith("head"))
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(module.net.features(x), module.net.features(x))
    weight = head[1].weight.detach()
    assert float(weight.std()) == pytest.approx(0.01, rel=0.15) and torch.count_nonzero(head[1].bias) == 0
    module.eval()
    assert not any(m.training for m in module.modules())


class Modes(L.Callback):
    """(head training, any encoder module training) at each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        encoder = [m.training for name, m in module.vit.named_modules() if not name.startswith("head")]
        self.seen.append((module.vit.head.training, any(encoder)))


def test_the_encoder_is_bit_identical_after_probe_training(tmp_path: Path) -> None:
    module = FineTuner(load("model", "vit_micro"), probe_optim(drop_path_rate=0.5), 10, batch_size=8)
    before, statistics = encoder_state(module), module.vit.head[0].running_mean.clone()
    head = module.vit.head[1].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(5)
    ]
    train, val = [((x,), y) for x, y in batches[:4]], batches[4:]
    modes = Modes()
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[modes],
        val_check_interval=2,  # a validation between updates: Lightning restores each module's mode after it
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    assert trainer.global_step == 4 and modes.seen == [(True, False)] * 4
    after = encoder_state(module)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(module.vit.head[1].weight, head)  # the head did train
    assert not torch.equal(module.vit.head[0].running_mean, statistics)  # and so did its statistics


# -- the optimiser ---------------------------------------------------------------------------------------
def test_lars_groups_follow_maes_protocol() -> None:
    from timm.optim import Lars

    optim = probe_optim()
    module = with_trainer(FineTuner(load("model", "vit_micro"), optim, 10, batch_size=512), 900)
    assert module.lr == pytest.approx(0.1 * 512 / 256)  # lr = 0.1 x batch / 256
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, Lars)
    names = {id(p): name for name, p in module.vit.named_parameters()}
    groups = {tuple(names[id(p)] for p in g["params"]): g for g in optimizer.param_groups}
    assert set(groups) == {("head.1.weight",), ("head.1.bias",)}  # the head only, a group each
    matrix, vector = groups[("head.1.weight",)], groups[("head.1.bias",)]
    assert matrix["always_adapt"] and not vector["always_adapt"]  # MAE adapts ndim > 1 only
    for group in (matrix, vector):
        assert (group["momentum"], group["weight_decay"], group["trust_coeff"]) == (0.9, 0.0, 0.001)
        assert group["eps"] == 0 and group["dampening"] == 0  # MAE's ratio has no eps
        assert not group["nesterov"] and not group["trust_clip"]
    scheduler = build_scheduler(optimizer, optim, 900)
    scheduler.step_update(100)  # the end of the warm-up: 10 of 90 epochs
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])
    scheduler.step_update(50)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.1])


def mae_lars_step(params: list, momenta: dict, lr: float, wd: float, tc: float, m: float) -> None:
    """MAE's ``util/lars.py`` step, transcribed: matrices get weight decay and the trust ratio, vectors neither."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp + wd * p
            w_norm, u_norm = p.norm(), dp.norm()
            one = torch.ones_like(w_norm)
            q = torch.where(w_norm > 0, torch.where(u_norm > 0, tc * w_norm / u_norm, one), one)
            dp = dp * q
        mu = momenta.setdefault(p, torch.zeros_like(p))
        mu.mul_(m).add_(dp)
        p.sub_(lr * mu)


# timm's per-tensor loop (its default on CPU) and its multi-tensor path (on CUDA)
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_equals_maes_formula_over_several_steps(foreach: bool) -> None:
    optim = probe_optim()
    module = with_trainer(FineTuner(load("model", "vit_micro"), optim, 10, batch_size=256), 10)
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["foreach"] = foreach
    ours = [module.vit.head[1].weight, module.vit.head[1].bias]
    theirs = [p.detach().clone() for p in ours]
    momenta: dict = {}
    g = torch.Generator().manual_seed(0)
    for step, lr in enumerate([0.1, 0.3, 0.3, 0.05, 0.2]):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=g) * (step + 1)
            b.grad = a.grad.clone()
        optimizer.step()
        with torch.no_grad():
            mae_lars_step(theirs, momenta, lr, wd=0.0, tc=0.001, m=0.9)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-8)
    moved = ours[0].detach() - FineTuner(load("model", "vit_micro"), optim, 10).vit.head[1].weight.detach()
    assert float(moved.norm()) > 0  # the weight did move: the trust ratio scaled its steps, not zeroed them


# -- export ----------------------------------------------------------------------------------------------
def test_the_exported_head_folds_the_norm_and_gives_the_probes_logits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = check(
        compose("finetune", ["pretrained=none", "model=vit_micro", "optim=linear_probe"]), touch_data=False
    )
    module = FineTuner(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.optim), 10)
    norm, linear = module.vit.head
    with torch.no_grad():  # statistics and a head far from their initial values
        norm.running_mean.copy_(torch.randn(32))
        norm.running_var.copy_(torch.rand(32) * 3 + 0.05)
        linear.weight.copy_(torch.randn(10, 32))
        linear.bias.copy_(torch.randn(10))
    out = tmp_path / "out"
    export_classifier(module, cfg, out)
    spec = json.loads((out / "model.json").read_text())
    vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"]).eval()
    vit.load_state_dict(load_file(out / "model.safetensors"))  # strict: an ordinary timm head
    assert isinstance(vit.head, torch.nn.Linear)
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(module.net.normalize(x)), module.eval()(x), rtol=1e-5, atol=1e-5)


# -- the recipes and the command --------------------------------------------------------------------------
def test_paper_recipe_is_maes_and_the_cpu_recipe_never_mirrors_a_digit() -> None:
    def composed(*overrides: str) -> dict:
        return OmegaConf.to_container(compose("finetune", ["optim=linear_probe", *overrides]), resolve=True)

    paper = composed("recipe=paper")
    assert (paper["trainer"]["max_epochs"], paper["data"]["batch_size"]) == (90, 16384)
    optim = paper["optim"]
    assert (optim["opt"], optim["lr"], optim["lr_batch"], optim["momentum"]) == ("lars", 0.1, 256, 0.9)
    assert (optim["weight_decay"], optim["trust_coefficient"], optim["min_lr"]) == (0.0, 0.001, 0.0)
    assert round(optim["warmup_fraction"] * 90) == 10 and optim["min_steps"] == 0
    assert not any(optim[k] for k in ("mixup", "cutmix", "label_smoothing", "drop_path_rate"))
    for recipe, flips, scale in ((paper, True, (0.08, 1.0)), (composed(), False, (0.8, 1.0))):
        steps = train_transform(recipe["optim"], 32).transforms[1].transforms
        names = [type(t).__name__ for t in steps]
        assert ("RandomHorizontalFlip" in names) == flips and "RandomErasing" not in names
        assert not any(hasattr(t, "ops") for t in steps)  # no RandAugment
        crop = next(t for t in steps if type(t).__name__ == "RandomResizedCropAndInterpolation")
        assert tuple(crop.scale) == scale


def test_a_layer_decay_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["finetune", "pretrained=none", "optim=linear_probe", "layer_decay=0.65"]) == 2
    err = capsys.readouterr().err
    one_line(err, "finetune")
    assert "layer_decay=0.65 does not apply to optim=linear_probe" in err
    assert list(tmp_path.iterdir()) == []


def test_linear_probe_run_keeps_the_pretrained_encoder_and_exports_a_timm_classifier(tmp_path: Path) -> None:
    pretrain = tmp_path / "pretrain"
    args = ["pretrain", "model=vit_micro", "trainer.max_steps=1", "trainer.enable_progress_bar=false"]
    assert run_cli([*args, f"hydra.run.dir={pretrain}"]) == 0
    run_dir = tmp_path / "probe"
    args = ["finetune", "optim=linear_probe", f"pretrained={pretrain}", "trainer.max_steps=3", *FAST]
    assert run_cli([*args, f"hydra.run.dir={run_dir}"]) == 0
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["optim"]["name"] == "linear_probe" and spec["layer_decay"] == 1.0
    vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    weights = load_file(run_dir / "model.safetensors")
    vit.load_state_dict(weights)  # strict: the norm folded away
    encoder = load_file(pretrain / "encoder.safetensors")
    assert set(weights) - set(encoder) == {"head.weight", "head.bias"}
    for name, tensor in encoder.items():
        assert torch.equal(weights[name], tensor), name  # frozen, bit for bit
    record = json.loads((run_dir / "run.json").read_text())
    assert record["steps"] == 3 and 0.0 <= record["val_top1"] <= 1.0


def test_lars_with_weight_decay_is_refused_in_one_line(capsys) -> None:
    from helpers import run_cli

    assert run_cli(["finetune", "pretrained=none", "optim=linear_probe", "optim.weight_decay=0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only at weight_decay=0" in err[0]

"""The two recipes: recipe=paper composes to exactly the paper's values, recipe=cpu is the default; and the
recipe pieces each method adds (MAE's schedule, the supervised/RotNet regularisers, BYOL's target decay)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import make_method
from omegaconf import OmegaConf

from advpt.config import compose
from advpt.data.transforms import pretrain_views
from advpt.methods.byol import cosine_momentum
from advpt.methods.sizes import sized_for
from advpt.training.schedule import warmup_cosine

VIT_B = {"name": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "kwargs": {}}

# He et al. 2022: MAE (Table 8) and from-scratch ViT-B (Table 11); Grill et al. 2020 / MoCo v3 for BYOL.
PAPER_METHODS = {
    "mae": {
        "epochs": 800,
        "base_lr": 1.5e-4,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "warmup_fraction": 40 / 800,
        "min_lr": 0.0,
        "mask_ratio": 0.75,
        "norm_pix_loss": True,
        "views": {"kind": "mae", "crop_scale": [0.2, 1.0]},
    },
    "supervised": {
        "epochs": 300,
        "base_lr": 1e-4,
        "weight_decay": 0.3,
        "betas": [0.9, 0.95],
        "warmup_fraction": pytest.approx(20 / 300, abs=1e-4),
        "min_lr": 0.0,
        "label_smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "drop_path_rate": 0.1,
        "ema_decay": 0.9999,
        "views": {"kind": "supervised", "crop_scale": [0.08, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1"},
    },
    # The supervised recipe without mixup and cutmix (paper App. C).
    "rotnet": {
        "epochs": 300,
        "base_lr": 1e-4,
        "weight_decay": 0.3,
        "betas": [0.9, 0.95],
        "warmup_fraction": pytest.approx(20 / 300, abs=1e-4),
        "min_lr": 0.0,
        "label_smoothing": 0.1,
        "drop_path_rate": 0.1,
        "ema_decay": 0.9999,
        "views": {"kind": "rotnet", "crop_scale": [0.08, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1"},
    },
    "byol": {
        "epochs": 1000,
        "base_lr": 1.5e-4,
        "weight_decay": 0.1,
        "betas": [0.9, 0.999],
        "warmup_fraction": 10 / 1000,
        "min_lr": 0.0,
        "momentum": 0.996,
        "views": {"kind": "byol", "crop_scale": [0.08, 1.0]},
    },
}


def composed(command: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose(command, list(overrides)), resolve=True)


# -- recipe=paper is the paper, exactly -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER_METHODS))
def test_paper_pretraining_recipe_is_exact(name: str) -> None:
    cfg = composed("pretrain", "recipe=paper", f"method={name}")
    expected = dict(PAPER_METHODS[name])
    epochs = expected.pop("epochs")
    assert cfg["trainer"]["max_epochs"] == epochs and cfg["trainer"]["max_steps"] == -1
    assert cfg["data"]["batch_size"] == 4096
    assert {k: cfg["model"][k] for k in VIT_B} == VIT_B
    # the heads at ViT-B's width: MAE's decoder (He et al., App. A.1) and BYOL's MLPs (Grill et al.)
    heads = {
        "mae": ("decoder", {"dim": 512, "depth": 8, "heads": 16, "mlp_dim": 2048}),
        "byol": ("heads", {"hidden": 4096, "out": 256}),
    }
    if name in heads:
        key, paper = heads[name]
        assert sized_for(cfg["method"].pop(key), 768) == paper
    method = {k: v for k, v in cfg["method"].items() if k != "name"}
    assert method == expected
    assert cfg["attack"]["steps"] == 2 and cfg["attack"]["step_size"] is None  # PGD-2, alpha = 5 eps / 8


def test_paper_fine_tuning_and_transfer_recipes_are_exact() -> None:
    cfg = composed("finetune", "recipe=paper")
    assert cfg["trainer"]["max_epochs"] == 100 and cfg["trainer"]["max_steps"] == -1
    assert cfg["data"]["batch_size"] == 512 and cfg["layer_decay"] == 0.75
    optim = cfg["optim"]
    assert (optim["opt"], optim["lr"], optim["lr_batch"], optim["weight_decay"]) == ("adamw", 5e-4, 512, 0.05)
    assert (optim["warmup_fraction"], optim["min_lr"], optim["drop_path_rate"]) == (0.05, 1e-6, 0.1)
    assert optim["auto_augment"] == "rand-m9-mstd0.5-inc1" and optim["re_prob"] == 0.25
    assert (optim["scale"], optim["hflip"]) == ([0.08, 1.0], 0.5)
    assert (optim["mixup"], optim["cutmix"], optim["label_smoothing"]) == (0.8, 1.0, 0.1)

    cfg = composed("finetune", "recipe=paper", "optim=sgd_transfer")
    assert cfg["trainer"]["max_steps"] == 2500 and cfg["trainer"]["max_epochs"] == -1
    assert cfg["data"]["batch_size"] == 512 and cfg["trainer"]["gradient_clip_val"] == 1.0
    optim = cfg["optim"]
    assert (optim["opt"], optim["lr"], optim["lr_batch"], optim["momentum"]) == ("momentum", 0.01, 512, 0.9)
    assert (optim["weight_decay"], optim["warmup_fraction"], optim["min_lr"]) == (0.0, 0.2, 0.0)


def test_cpu_recipe_is_the_default_and_any_key_still_overrides() -> None:
    cfg = composed("pretrain")
    assert cfg["recipe"]["name"] == "cpu"
    assert cfg["model"]["kwargs"] == {"embed_dim": 128, "depth": 6, "num_heads": 4}
    assert cfg["model"]["patch_size"] == 8 and cfg["data"]["batch_size"] == 64
    assert composed("finetune")["recipe"]["name"] == "cpu"

    cfg = composed(
        "pretrain", "recipe=paper", "model=vit_micro", "method.base_lr=1e-3", "trainer.max_epochs=3"
    )
    assert cfg["model"]["img_size"] == 16 and cfg["method"]["base_lr"] == 1e-3
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["batch_size"] == 4096
    cfg = composed("finetune", "recipe=paper", "data.batch_size=32", "optim.lr=1e-3")
    assert cfg["data"]["batch_size"] == 32 and cfg["optim"]["lr"] == 1e-3


# -- MAE's schedule: linear warm-up from 0, then a half-cycle cosine to min_lr --------------------------
def lr_at(scheduler, optimizer, step: int) -> float:
    scheduler.step_update(step)
    return optimizer.param_groups[0]["lr"]


def test_warmup_then_half_cycle_cosine_to_zero() -> None:
    peak, total = 2e-3, 1000  # 5% warm-up: 50 steps, then 950 of cosine
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = warmup_cosine(optimizer, total, 0.05, 0.0)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the first update uses lr 0
    assert lr_at(scheduler, optimizer, 25) == pytest.approx(peak / 2)
    assert lr_at(scheduler, optimizer, 50) == pytest.approx(peak)  # end of warm-up: the peak
    assert lr_at(scheduler, optimizer, 50 + 475) == pytest.approx(peak / 2)  # cosine midpoint
    t = 800
    assert lr_at(scheduler, optimizer, t) == pytest.approx(
        peak * 0.5 * (1 + math.cos(math.pi * (t - 50) / 950))
    )
    assert lr_at(scheduler, optimizer, total) == pytest.approx(0.0, abs=1e-15)


def test_pretraining_uses_the_schedule_of_its_method_config() -> None:
    module = make_method("mae")
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=200)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    peak = 1.5e-4 * 64 / 256
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert lr_at(scheduler, optimizer, 10) == pytest.approx(peak)  # 5% of 200 steps
    assert lr_at(scheduler, optimizer, 105) == pytest.approx(peak / 2)
    assert lr_at(scheduler, optimizer, 200) == pytest.approx(0.0, abs=1e-15)


# -- supervised / RotNet: He et al.'s from-scratch regularisers ----------------------------------------
def test_rotnet_targets_are_label_smoothed() -> None:
    module = make_method("rotnet")
    images, targets = module.inputs_and_targets(torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    assert targets.shape == (6, 4)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert sorted(set(targets.flatten().tolist())) == pytest.approx([0.1 / 4, 1 - 0.1 + 0.1 / 4])
    assert images.shape == (6, 3, 16, 16)
    assert (
        make_method("rotnet", label_smoothing=0.0).inputs_and_targets(images, targets.argmax(1))[1].dim() == 1
    )


@pytest.mark.parametrize("name", ["supervised", "rotnet"])
def test_supervised_recipe_has_drop_path_and_a_weight_ema(name: str, tmp_path) -> None:
    import json

    module = make_method(name)
    assert module.encoder.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert module.ema is not None and module.ema.decay == 0.9999
    ema_params = {id(p) for p in module.ema.parameters()}
    assert all(not p.requires_grad for p in module.ema.parameters())
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=10)
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not ema_params & optimised
    # The exported encoder is the average, described without the training-only drop path.
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.fill_(0.5)
    module.export_encoder(tmp_path)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "encoder.safetensors")
    assert all(bool((v == 0.5).all()) for k, v in state.items() if k.endswith("weight") and "norm" not in k)
    assert "drop_path_rate" not in json.loads((tmp_path / "encoder.json").read_text())["kwargs"]


def test_weight_ema_follows_timm_update_rule() -> None:
    module = make_method("supervised", ema_decay=0.9)
    encoder = module.encoder
    param, avg = next(encoder.parameters()), next(module.ema.module.parameters())
    # After the first update the average copies the weights (timm: decay 0 at step 1), then it moves by 1 - decay.
    with torch.no_grad():
        param.fill_(1.0)
    module.ema.update(encoder, step=1)
    assert torch.equal(avg, param)
    with torch.no_grad():
        param.fill_(2.0)
    module.ema.update(encoder, step=2)
    assert torch.allclose(avg, torch.full_like(avg, 0.9 * 1.0 + 0.1 * 2.0))


def test_supervised_views_apply_randaugment_and_stay_in_unit_range() -> None:
    spec = PAPER_METHODS["supervised"]["views"]
    views = pretrain_views(spec, 16)
    randaugment = next(t for t in views.transforms[0].transforms if hasattr(t, "ops"))
    assert len(randaugment.ops) > 10 and randaugment.num_layers == 2
    for op in randaugment.ops:  # strongest magnitude every time: posterize keeps 0 bits there
        op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
    image = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    for _ in range(20):
        (x,) = views(image)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    plain = pretrain_views({**spec, "auto_augment": None}, 16)
    assert not any(hasattr(t, "ops") for t in plain.transforms[0].transforms)


# -- BYOL ------------------------------------------------------------------------------------------------
def test_byol_target_decay_starts_at_grill_et_al_base() -> None:
    base = PAPER_METHODS["byol"]["momentum"]
    assert cosine_momentum(0, 1000, base) == pytest.approx(0.996)
    assert cosine_momentum(500, 1000, base) == pytest.approx(1 - 0.004 / 2)
    assert cosine_momentum(1000, 1000, base) == pytest.approx(1.0)


def test_cpu_fine_tuning_keeps_digits_digits() -> None:
    from advpt.finetune import train_transform

    optim = composed("finetune")["optim"]
    transform = train_transform(optim, 32)
    timm_steps = transform.transforms[1].transforms
    names = [type(t).__name__ for t in timm_steps]
    assert "RandomHorizontalFlip" not in names and "RandomErasing" not in names
    assert not any(hasattr(t, "ops") for t in timm_steps)  # no RandAugment
    crop = next(t for t in timm_steps if type(t).__name__ == "RandomResizedCropAndInterpolation")
    assert tuple(crop.scale) == (0.8, 1.0)
    paper = train_transform(composed("finetune", "recipe=paper")["optim"], 32).transforms[1].transforms
    assert any(hasattr(t, "ops") for t in paper) and "RandomHorizontalFlip" in [
        type(t).__name__ for t in paper
    ]


def test_cpu_transfer_never_mirrors_a_digit_and_the_paper_recipe_does() -> None:
    from advpt.finetune import train_transform

    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :2] = 255  # a bar on the left: mirrored, it is on the right
    cpu = train_transform(composed("finetune", "optim=sgd_transfer")["optim"], 32)
    paper = train_transform(composed("finetune", "recipe=paper", "optim=sgd_transfer")["optim"], 32)
    torch.manual_seed(0)
    left = [cpu(image)[:, :, :4].mean().item() > 0.5 for _ in range(40)]
    mirrored = [paper(image)[:, :, :4].mean().item() < 0.5 for _ in range(40)]
    assert all(left) and 5 < sum(mirrored) < 35

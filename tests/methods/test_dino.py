"""DINO: the loss, centre and schedules against facebookresearch/dino transcribed here, the head's normalised
last layer, the encoder on local crops, the multi-crop views, what the attack perturbs and holds fixed,
the recipe's optimisation pieces in a real Lightning run, the centre across processes, and CLI runs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import L2, load, make_method, run_cli
from torch.utils.data import DataLoader

from advpt.methods.dino_parts import (
    DINOHead,
    clip_per_parameter,
    cosine_value,
    dino_loss,
    teacher_probabilities,
    teacher_temperature,
    update_center,
)
from advpt.methods.momentum import cosine_momentum


# -- facebookresearch/dino, transcribed (main_dino.py's DINOLoss, utils.py's schedules and clipping) ------
class OfficialDINOLoss(torch.nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)  # one process: all_reduce and world size 1
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):  # fmt: skip
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_clip_gradients(model, clip):
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


# -- the loss, centre and schedules --------------------------------------------------------------------
@pytest.mark.parametrize("local_crops", [0, 3])
def test_dino_loss_and_centre_equal_the_official_dinoloss(local_crops: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, k, ncrops, epoch = 6, 40, 2 + local_crops, 3
    official = OfficialDINOLoss(k, ncrops, 0.04, 0.07, 5, 20)
    official.center = torch.randn(1, k, generator=g)  # a centre already moved
    center = official.center.clone()
    student = 3 * torch.randn(ncrops * b, k, generator=g)
    teacher = 3 * torch.randn(2 * b, k, generator=g)
    expected = official(student, teacher, epoch)
    tau_t = teacher_temperature(epoch, 5, 0.04, 0.07)
    targets = teacher_probabilities(teacher, center, tau_t).chunk(2)
    ours = dino_loss(student.chunk(ncrops), targets, 0.1)
    assert ours.shape == (b,)
    torch.testing.assert_close(ours.mean(), expected, rtol=1e-6, atol=1e-6)
    update_center(center, teacher, 0.9)
    torch.testing.assert_close(center, official.center, rtol=1e-6, atol=1e-7)


def test_teacher_temperature_and_weight_decay_schedules_equal_the_official_ones() -> None:
    nepochs, warmup = 300, 30
    official = OfficialDINOLoss(8, 4, 0.04, 0.07, warmup, nepochs).teacher_temp_schedule
    ours = [teacher_temperature(e, warmup, 0.04, 0.07) for e in range(nepochs)]
    np.testing.assert_allclose(ours, official, rtol=1e-12)
    assert teacher_temperature(0, 1, 0.04, 0.07) == 0.04 and teacher_temperature(0, 0, 0.04, 0.07) == 0.07
    epochs, per_epoch = 7, 13
    wd = official_cosine_scheduler(0.04, 0.4, epochs, per_epoch)
    np.testing.assert_allclose([cosine_value(i, epochs * per_epoch, 0.04, 0.4) for i in range(len(wd))], wd)
    momentum = official_cosine_scheduler(0.996, 1, epochs, per_epoch)  # the teacher's (main_dino.py)
    np.testing.assert_allclose(
        [cosine_momentum(i, len(momentum), 0.996) for i in range(len(momentum))], momentum
    )


def test_gradient_clipping_is_per_parameter_as_dinos() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    for p, scale in zip(net.parameters(), (0.01, 10.0, 0.1, 100.0), strict=True):
        p.grad = scale * torch.randn_like(p)
    twin = copy.deepcopy(net)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    official_clip_gradients(net, 3.0)
    clip_per_parameter(twin.parameters(), 3.0)
    norms = [p.grad.norm() for p in net.parameters()]
    assert max(norms) == pytest.approx(3.0, rel=1e-4) and min(norms) < 3.0  # some clipped, some not
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


def test_head_last_layer_is_weight_norm_with_its_norm_fixed_to_one_and_survives_deepcopy() -> None:
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden=64, bottleneck=16)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 50, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight)  # v
        reference.parametrizations.weight.original0.fill_(1.0)  # g: norm_last_layer
    x = torch.randn(5, 32)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), reference(z))
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    twin = copy.deepcopy(head)
    with torch.no_grad():
        twin.last_layer.weight.mul_(7.0)  # a copy of its own; the row norms are divided out
    torch.testing.assert_close(twin(x), head(x))
    assert twin.last_layer.weight.data_ptr() != head.last_layer.weight.data_ptr()


# -- the encoder on local crops, and the views -----------------------------------------------------
def test_encoder_reads_local_crops_as_timms_dynamic_size_vit_and_keeps_its_own_forward() -> None:
    import timm

    module = make_method("dino", drop_path_rate=0.0).eval()
    encoder = module.encoder
    dynamic = timm.create_model(encoder.name, **{**encoder.kwargs, "dynamic_img_size": True}).eval()
    dynamic.load_state_dict(encoder.vit.state_dict())
    full, small = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        own = encoder.vit.forward_features(encoder.normalize(full))
        assert torch.equal(encoder.resized_tokens(encoder.normalize(full)), own)  # no resampling at 16 px
        assert torch.equal(encoder.features(full), encoder.vit.forward_head(own, pre_logits=True))
        local = encoder.features(small)
        expected = dynamic.forward_head(dynamic.forward_features(encoder.normalize(small)), pre_logits=True)
    assert local.shape == (3, encoder.dim)
    torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-5)


def test_views_are_two_global_crops_and_the_local_crops_stacked() -> None:
    from PIL import Image

    from advpt.data.transforms import pretrain_views

    spec = load("method", "dino")["views"]
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    global1, global2, local = pretrain_views({**spec, "counts": {"dino_local": 4}}, 32)(image)
    assert global1.shape == global2.shape == (3, 32, 32) and local.shape == (4, 3, 16, 16)
    assert pretrain_views(spec, 224)(image)[2].shape == (8, 3, 96, 96)  # main_dino.py: 8 of 96 px
    assert len(pretrain_views({**spec, "counts": {"dino_local": 0}}, 32)(image)) == 2


# -- the step: what the attack perturbs and what it holds fixed -------------------------------------
def dino_batch(n: int = 8, local_crops: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(n, 3, 16, 16, generator=g), 0.5 * torch.rand(n, 3, 16, 16, generator=g).flip(-1)]
    views.append(torch.rand(n, local_crops, 3, 8, 8, generator=g))
    return views, torch.zeros(n, dtype=torch.long)


def test_attack_perturbs_the_global_crops_against_the_fixed_clean_teacher_and_moves_the_centre_after(
    record_pgd, monkeypatch
) -> None:
    import advpt.methods.dino as dino

    # the whole run in the teacher's warm-up: tau_t is 0.04 at step 0
    module = make_method("dino", attack=L2, drop_path_rate=0.0, teacher_temperature_warmup_fraction=1.0)
    module.train()
    with torch.no_grad():
        module.center.normal_()
    center, teacher = module.center.clone(), copy.deepcopy(module.teacher.state_dict())
    events: list[str] = []
    real_teacher, real_update = module.teacher_logits, dino.update_center
    monkeypatch.setattr(module, "teacher_logits", lambda x: events.append("teacher") or real_teacher(x))
    monkeypatch.setattr(dino, "update_center", lambda *a: events.append("centre") or real_update(*a))
    real_pgd = dino.PretrainMethod._attacked

    def attacked(self, *args, **kwargs):
        events.append("attack")
        return real_pgd(self, *args, **kwargs)

    monkeypatch.setattr(dino.PretrainMethod, "_attacked", attacked)
    (global1, global2, local), labels = dino_batch()
    n, crops = global1.shape[0], local.shape[1]
    loss = module.training_step(([global1, global2, local], labels), 0)
    assert events == ["teacher", "attack", "centre"], "teacher once, before the attack; the centre after it"
    (call,) = record_pgd
    assert torch.equal(call["x"], torch.cat([global1, global2]))  # the global crops only, each its own row
    assert call["delta"].shape == (2 * n, 3, 16, 16) and call["delta"].abs().amax() > 0
    with torch.no_grad():
        t_logits = real_teacher(torch.cat([global1, global2]))
        targets = teacher_probabilities(t_logits, center, 0.04)  # the teacher's temperature at step 0
        t1, t2 = targets.chunk(2)
        adversarial = torch.cat([global1, global2]) + call["delta"]
        # the attack's loss: each global crop against the teacher on the other, clean, global crop
        s = module.student(adversarial)
        log_p = F.log_softmax(s / 0.1, dim=-1)
        expected = -(torch.cat([t2, t1]) * log_p).sum(-1)
        torch.testing.assert_close(call["loss_fn"](adversarial), expected, rtol=1e-5, atol=1e-5)
        # the update: every pair, the attacked global crops and the clean local crops
        local_logits = module.student(local.transpose(0, 1).flatten(0, 1)).chunk(crops)
        full = dino_loss([*s.chunk(2), *local_logits], [t1, t2], 0.1).mean()
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    expected_center = center.clone()
    real_update(expected_center, t_logits, 0.9)
    torch.testing.assert_close(module.center, expected_center)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher[key]), key
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())


def test_logged_teacher_entropy_is_that_of_the_centred_sharpened_teacher_and_ln_k_when_uniform(
    monkeypatch,
) -> None:
    module = make_method("dino", drop_path_rate=0.0, teacher_temperature_warmup_fraction=1.0)
    module.train()
    logged: dict = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    (global1, global2, local), labels = dino_batch()
    with torch.no_grad():
        module.center.normal_()
        targets = teacher_probabilities(
            module.teacher_logits(torch.cat([global1, global2])), module.center, 0.04
        )
    expected = torch.distributions.Categorical(probs=targets).entropy().mean()
    module.training_step(([global1, global2, local], labels), 0)
    torch.testing.assert_close(logged["train/teacher_entropy"], expected)
    # A teacher that gives every input the same logits is uniform once centred: entropy ln K, DINO's collapse.
    with torch.no_grad():
        module.teacher["head"].last_layer.weight.zero_()
        module.center.zero_()
    module.training_step(([global1, global2, local], labels), 0)
    out = module.center.shape[1]
    torch.testing.assert_close(
        logged["train/teacher_entropy"], torch.tensor(math.log(out)), rtol=1e-5, atol=1e-5
    )


def test_the_attack_refuses_a_loss_that_moves_the_centre(monkeypatch) -> None:
    """The centre is loss state the attack's passes must leave alone: frozen() catches a loss that moves it."""
    module = make_method("dino", attack=L2)
    module.train()
    real = module.student

    def moving(x):
        module.center.add_(1.0)
        return real(x)

    monkeypatch.setattr(module, "student", moving)
    with pytest.raises(RuntimeError, match="changed the state center"):
        module.training_step(dino_batch(), 0)


def test_attacked_loss_exceeds_clean_loss(record_pgd) -> None:
    module = make_method("dino", attack={"norm": "linf", "eps": 8 / 255, "steps": 3})
    module.train()
    torch.manual_seed(1)
    module.training_step(dino_batch(n=16), 0)
    (call,) = record_pgd
    module.eval()
    with torch.no_grad():
        clean = call["loss_fn"](call["x"]).mean()
        attacked = call["loss_fn"](call["x"] + call["delta"]).mean()
    assert attacked > clean


def test_nominal_step_trains_every_student_parameter_and_no_teacher_one() -> None:
    module = make_method("dino")
    module.train()
    assert not module.teacher.training and not any(m.training for m in module.teacher.modules())
    module.training_step(dino_batch(), 0).backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert not any(p.requires_grad for p in module.teacher.parameters())


# -- the recipe in a real Lightning run ------------------------------------------------------------
class _Snapshots(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.rows.append({"before": copy.deepcopy(module.state_dict())})

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.rows[-1]["decay"] = [g["weight_decay"] for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.rows[-1]["after"] = copy.deepcopy(module.state_dict())


def test_recipe_freezes_the_last_layer_schedules_the_decay_and_the_teacher(tmp_path: Path) -> None:
    steps = 4
    module = make_method("dino", momentum=0.5, base_lr=0.05, freeze_last_layer_fraction=0.5)
    seen = _Snapshots()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[seen],
    )  # fmt: skip
    batches = [dino_batch(n=4, seed=k) for k in range(steps)]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(seen.rows) == steps
    last = "head.last_layer.weight"
    for k, row in enumerate(seen.rows):
        before, after = row["before"], row["after"]
        frozen = k < 2  # half of 4 steps
        assert torch.equal(after[last], before[last]) == frozen, f"step {k}"
        assert not torch.equal(after["head.mlp.0.weight"], before["head.mlp.0.weight"])
        # the decayed group follows utils.cosine_scheduler(0.04, 0.4); the other keeps 0
        wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * k / steps))
        assert sorted(row["decay"]) == pytest.approx([0.0, wd]), f"step {k}"
        tau = cosine_momentum(k, steps, 0.5)
        for name in ("encoder.vit.blocks.0.attn.qkv.weight", last):
            expected = tau * before[f"teacher.{name}"] + (1 - tau) * after[name]
            torch.testing.assert_close(after[f"teacher.{name}"], expected, msg=f"step {k}, {name}")


# -- the centre across processes --------------------------------------------------------------------
def _centre_in_process(rank: int, world: int, init: str, teacher: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        center = torch.ones(1, teacher.shape[1])
        update_center(center, teacher.chunk(world)[rank], 0.9)
        torch.save(center, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_centre_of_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    teacher = torch.randn(12, 10)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_centre_in_process, args=(2, init, teacher, str(tmp_path / "centre")), nprocs=2, join=True)
    one = torch.ones(1, 10)
    update_center(one, teacher, 0.9)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"centre.{rank}"), one)


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", [["attack=none"], ["attack=l2", "eps=0.5"]])
def test_pretrain_runs_and_exports_the_teachers_encoder(attack: list[str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = ["pretrain", "method=dino", *attack, "model=vit_micro", "monitor=none", "data.batch_size=8"]
    args += ["trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    assert run_cli([*args, f"hydra.run.dir={run}"]) == 0
    exported = load_file(str(run / "encoder.safetensors"))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["center"].abs().sum() > 0  # moved by the steps, saved for resuming
    for name, value in exported.items():
        torch.testing.assert_close(value, state[f"teacher.encoder.vit.{name}"], rtol=0, atol=0)
    assert any(not torch.equal(exported[n], state[f"encoder.vit.{n}"]) for n in exported)
    metrics = (run / "metrics.csv").read_text()
    assert ("train/loss_attacked" in metrics) == (attack != ["attack=none"])

"""SimCLR: NT-Xent against the official add_contrastive_loss (one process and cross-replica), the loss of
2 processes with B/2 images against 1 with B, and the attack (ACL's both views, RoCL's first view)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method, run_cli

import advpt.methods.simclr as simclr
from advpt.methods.simclr import nt_xent

OFFICIAL_LARGE_NUM = 1e9


def official_add_contrastive_loss(
    hidden: torch.Tensor,
    temperature: float,
    large: tuple[torch.Tensor, torch.Tensor] | None = None,
    replica_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """google-research/simclr objective.py ``add_contrastive_loss`` (hidden_norm=True), transcribed in torch.

    ``hidden``: [2n, d], this replica's first views then its second views (``tf.split(hidden, 2, 0)``).
    ``large``: (hidden1_large, hidden2_large), every replica's normalised halves as ``tpu_cross_replica_concat``
    gives them (None: one replica). Returns (loss_a + loss_b, per-row loss_a, per-row loss_b);
    ``tf.losses.softmax_cross_entropy`` with weights 1.0 averages its rows, so loss = mean(a) + mean(b).
    """
    hidden = F.normalize(hidden, dim=-1)  # tf.math.l2_normalize(hidden, -1)
    hidden1, hidden2 = torch.split(hidden, hidden.shape[0] // 2, 0)
    batch_size = hidden1.shape[0]
    if large is not None:
        hidden1_large, hidden2_large = large
        enlarged_batch_size = hidden1_large.shape[0]
        labels_idx = torch.arange(batch_size) + replica_id * batch_size
        labels = F.one_hot(labels_idx, enlarged_batch_size * 2).float()
        masks = F.one_hot(labels_idx, enlarged_batch_size).float()
    else:
        hidden1_large, hidden2_large = hidden1, hidden2
        labels = F.one_hot(torch.arange(batch_size), batch_size * 2).float()
        masks = F.one_hot(torch.arange(batch_size), batch_size).float()

    logits_aa = hidden1 @ hidden1_large.T / temperature
    logits_aa = logits_aa - masks * OFFICIAL_LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature
    logits_bb = logits_bb - masks * OFFICIAL_LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature

    def softmax_cross_entropy(onehot: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -(onehot * torch.log_softmax(logits, dim=1)).sum(1)

    rows_a = softmax_cross_entropy(labels, torch.cat([logits_ab, logits_aa], 1))
    rows_b = softmax_cross_entropy(labels, torch.cat([logits_ba, logits_bb], 1))
    return rows_a.mean() + rows_b.mean(), rows_a, rows_b


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_is_the_official_add_contrastive_loss(temperature: float) -> None:
    n, d = 12, 16
    hidden = torch.randn(2 * n, d, dtype=torch.float64).float()
    official, rows_a, rows_b = official_add_contrastive_loss(hidden, temperature)
    per_example = nt_xent(hidden[:n], hidden[n:], temperature)
    torch.testing.assert_close(per_example, (rows_a + rows_b) / 2, rtol=1e-5, atol=1e-5)
    # the batch loss is the official sum of the two views' means
    module = make_method("simclr", temperature=temperature)
    torch.testing.assert_close(module.reduce(per_example), official, rtol=1e-5, atol=1e-5)
    # and the gradient that trains the projector is the official one
    a = hidden.clone().requires_grad_(True)
    b = hidden.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(module.reduce(nt_xent(a[:n], a[n:], temperature)), a)
    (gb,) = torch.autograd.grad(official_add_contrastive_loss(b, temperature)[0], b)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    # a loss that left a view's similarity to itself in its denominator would not match
    assert (rows_a - F.cross_entropy(hidden[:1] @ hidden.T, torch.tensor([n]))).abs().max() > 1e-3


def test_nt_xent_of_one_replica_is_the_official_cross_replica_loss(monkeypatch) -> None:
    """Replica r of 3 sees the others' views as negatives and its labels offset by r * n."""
    n, d, replicas, temperature = 4, 8, 3, 0.2
    hiddens = [torch.randn(2 * n, d) for _ in range(replicas)]
    normalised = [F.normalize(h, dim=-1) for h in hiddens]
    large = (torch.cat([h[:n] for h in normalised]), torch.cat([h[n:] for h in normalised]))
    whole = torch.cat([torch.cat([h[:n] for h in hiddens]), torch.cat([h[n:] for h in hiddens])])
    _, whole_a, whole_b = official_add_contrastive_loss(whole, temperature)
    for r in range(replicas):
        official, rows_a, rows_b = official_add_contrastive_loss(hiddens[r], temperature, large, r)
        gathered = iter([large[0], large[1]])
        monkeypatch.setattr(simclr, "gather_with_grad", lambda z, r=r, g=gathered: (next(g), r))
        per_example = nt_xent(hiddens[r][:n], hiddens[r][n:], temperature)
        torch.testing.assert_close(per_example, (rows_a + rows_b) / 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(2 * per_example.mean(), official, rtol=1e-5, atol=1e-5)
        # ... and it is this replica's share of one replica's loss over all 3 n images
        mine = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(rows_a, whole_a[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows_b, whole_b[mine], rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _half_batch(rank: int, port: int, z: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        n = z.shape[0] // 2 // 2  # images per process
        z1, z2 = z[: 2 * n], z[2 * n :]
        mine = torch.cat([z1[rank * n : (rank + 1) * n], z2[rank * n : (rank + 1) * n]]).requires_grad_(True)
        loss = 2 * nt_xent(mine[:n], mine[n:], 0.5).mean()
        (grad,) = torch.autograd.grad(loss, mine)
        torch.save({"loss": loss.detach(), "grad": grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_the_batch_give_one_process_loss_with_the_whole(tmp_path: Path) -> None:
    """The real all_gather (gloo): each process's loss is its images' share of the whole batch's, and the
    gradient reaching each process's projections, averaged over the 2 (as DDP averages), is 1 process's."""
    import torch.multiprocessing as mp

    n, d = 6, 8
    z = torch.randn(2 * n, d)  # first views of the n images, then their second views
    mp.spawn(_half_batch, args=(_free_port(), z, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = z.clone().requires_grad_(True)
    loss = 2 * nt_xent(whole[:n], whole[n:], 0.5).mean()
    (grad,) = torch.autograd.grad(loss, whole)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    half = n // 2
    for r, got in enumerate(ranks):
        rows = torch.cat([torch.arange(r * half, (r + 1) * half), n + torch.arange(r * half, (r + 1) * half)])
        torch.testing.assert_close(got["grad"] / 2, grad[rows], rtol=1e-5, atol=1e-7)


def views(n: int = 8, size: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.rand(n, 3, size, size), 0.5 * torch.rand(n, 3, size, size).flip(-1)], torch.zeros(n)


L2 = {"norm": "l2", "eps": 1.0, "steps": 3}


@pytest.mark.parametrize("attack_views", ["both", "one"])
def test_the_attack_raises_the_loss_and_leaves_batch_norm_as_it_found_it(
    attack_views: str, monkeypatch
) -> None:
    module = make_method("simclr", attack=L2, attack_views=attack_views)
    module.train()
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = simclr.PretrainMethod._attacked

    def spy(self, loss_fn, x, support, coupled):
        seen["before"] = {k: v.clone() for k, v in self.named_buffers()}
        out = real(self, loss_fn, x, support, coupled)
        seen["after"] = {k: v.clone() for k, v in self.named_buffers()}
        seen["loss_fn"], seen["x"], seen["out"] = loss_fn, x, out
        return out

    monkeypatch.setattr(simclr.PretrainMethod, "_attacked", spy)
    module.training_step(views(), 0)
    assert "projector.1.running_mean" in seen["before"]
    for name, value in seen["before"].items():
        assert torch.equal(seen["after"][name], value), name
    # the training pass after it does move them (the check above could see a change)
    moved = dict(module.named_buffers())["projector.1.running_mean"]
    assert not torch.equal(moved, seen["before"]["projector.1.running_mean"])
    module.eval()
    with torch.no_grad():
        clean, attacked = seen["loss_fn"](seen["x"]), seen["loss_fn"](seen["out"])
    assert module.reduce(attacked) > module.reduce(clean) + 0.1


def test_acl_perturbs_both_views_jointly_as_a_coupled_loss(record_pgd) -> None:
    module = make_method("simclr", attack=L2)
    module.train()
    (view1, view2), y = views()
    module.training_step(([view1, view2], y), 0)
    (call,) = record_pgd
    assert call["coupled"] is True
    assert isinstance(call["x"], tuple) and len(call["x"]) == 2
    assert torch.equal(call["x"][0], view1) and torch.equal(call["x"][1], view2)
    for delta in call["delta"]:  # each view in its own ball, both moved to its edge
        norms = delta.flatten(1).norm(dim=1)
        assert norms.max() <= 1.0 + 1e-5 and norms.min() > 0.5
    # the loss of one image reads the other images' views (the negatives): the batch is coupled
    module.eval()
    x = tuple(t.clone() for t in call["x"])
    with torch.no_grad():
        before = call["loss_fn"](x)
        x[0][1:] = torch.rand_like(x[0][1:])
        assert (call["loss_fn"](x)[0] - before[0]).abs() > 1e-4


def test_restarts_of_the_coupled_attack_keep_the_best_restart_whole(monkeypatch) -> None:
    """Of 4 restarts the one with the highest total loss is returned, both views and every image together,
    though another restart scored higher on some images (a per-image choice would have mixed them)."""
    import advpt.methods.base as base

    scored: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []
    returned = {}
    real = base.pgd

    def spy(loss_fn, x, attack, **kwargs):
        def recording(inputs):
            loss = loss_fn(inputs)
            if not torch.is_grad_enabled():  # the score of a finished restart
                scored.append((tuple(t.clone() for t in inputs), loss.detach().clone()))
            return loss

        returned["x"], returned["delta"] = x, real(recording, x, attack, **kwargs)
        return returned["delta"]

    monkeypatch.setattr(base, "pgd", spy)
    module = make_method("simclr", attack={**L2, "restarts": 4, "eps": 2.0})
    module.train()
    module.training_step(views(n=16), 0)
    restarts = scored[:4]  # then the logging step's clean / attacked diagnostics, if any
    totals = torch.stack([loss.sum() for _, loss in restarts])
    best = int(totals.argmax())
    for kept, x, delta in zip(restarts[best][0], returned["x"], returned["delta"], strict=True):
        torch.testing.assert_close(x + delta, kept, rtol=0, atol=1e-6)
    per_image = torch.stack([loss for _, loss in restarts])
    assert (per_image.argmax(0) != best).any(), "every image's best restart is the best: nothing tested"


def test_rocl_perturbs_the_first_view_against_the_second_views_fixed_clean_projections(
    record_pgd, monkeypatch
) -> None:
    module = make_method("simclr", attack=L2, attack_views="one")
    module.train()
    (view1, view2), y = views()
    passes: list[dict] = []  # every projection: its input and output, grad mode, train mode
    real = module.project

    def project(x: torch.Tensor) -> torch.Tensor:
        z = real(x)
        passes.append({"x": x.detach().clone(), "z": z.detach().clone(), "grad": torch.is_grad_enabled()})
        passes[-1]["training"] = module.training
        return z

    monkeypatch.setattr(module, "project", project)
    module.training_step(([view1, view2], y), 0)
    (call,) = record_pgd
    assert call["coupled"] is True and torch.equal(call["x"], view1)  # the first view alone
    n = view1.shape[0]
    attack_passes, training_pass = passes[:-1], passes[-1]
    (second,) = [p for p in attack_passes if torch.equal(p["x"], view2)]  # once, clean, then held
    assert not second["grad"] and not second["training"]  # no gradient, in the attack's eval mode
    first = [p for p in attack_passes if p is not second]
    assert len(first) == L2["steps"]  # the K input-gradient passes, all of the perturbed first view
    assert all(p["x"].shape[0] == n and not torch.equal(p["x"], view1) for p in first)
    assert all(p["grad"] and not p["training"] for p in first)
    # training: the attacked first view and the clean second view, one pass, in training mode
    assert training_pass["grad"] and training_pass["training"]
    torch.testing.assert_close(training_pass["x"][:n], view1 + call["delta"], rtol=0, atol=1e-6)
    assert torch.equal(training_pass["x"][n:], view2)
    # the objective reads the second view's projections as the attack found them, even after the training
    # pass moved the batch-norm statistics (a fresh projection of the second view now differs)
    module.eval()
    with torch.no_grad():
        got = call["loss_fn"](view1)
        z1 = real(view1)
        torch.testing.assert_close(got, nt_xent(z1, second["z"], module.temperature))
        assert (got - nt_xent(z1, real(view2), module.temperature)).abs().max() > 1e-4


def test_a_bad_attack_views_or_temperature_is_refused() -> None:
    from advpt.errors import UserError

    with pytest.raises(UserError, match="method.attack_views=all is invalid: choose one of both, one"):
        make_method("simclr", attack_views="all")
    with pytest.raises(UserError, match="method.temperature=0 is out of range"):
        make_method("simclr", temperature=0.0)


@pytest.mark.parametrize(
    "extra", [[], ["attack=l2", "eps=0.5"], ["attack=l2", "eps=0.5", "method.attack_views=one"]]
)
def test_a_short_run_writes_the_encoder(extra: list[str], tmp_path: Path) -> None:
    import json

    import timm
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = ["pretrain", "method=simclr", "model=vit_micro", "monitor=none", "trainer.max_steps=2"]
    args += ["data.batch_size=16", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    assert run_cli([*args, *(extra or ["attack=none"]), f"hydra.run.dir={run}"]) == 0
    spec = json.loads((run / "encoder.json").read_text())
    assert spec["method"] == "simclr"
    vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    vit.load_state_dict(load_file(run / "encoder.safetensors"))
    metrics = (run / "metrics.csv").read_text()
    assert "train/loss" in metrics and (("train/loss_attacked" in metrics) == bool(extra))

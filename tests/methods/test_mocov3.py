"""MoCo v3: its loss against the official code transcribed, the keys gathered over processes (2 x B/2 gives
1 x B), what the attack perturbs and holds fixed, the fixed patch projection, and runs through the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import load, make_method, run_cli
from safetensors.torch import load_file
from torch import nn

import advpt.methods.base as base
from advpt.methods.mocov3 import contrastive_loss, gather_keys, mlp

L2 = {"norm": "l2", "eps": 1.0, "steps": 3}
T = 0.2


def views(n: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 16, 16, generator=g) for _ in range(2)], torch.zeros(n, dtype=torch.long)


# -- the official code (facebookresearch/moco-v3, moco/builder.py), transcribed ---------------------
def official_build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True):
    mlp_ = []
    for l in range(num_layers):  # noqa: E741 - the official name
        dim1 = input_dim if l == 0 else mlp_dim
        dim2 = output_dim if l == num_layers - 1 else mlp_dim
        mlp_.append(nn.Linear(dim1, dim2, bias=False))
        if l < num_layers - 1:
            mlp_.append(nn.BatchNorm1d(dim2))
            mlp_.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp_.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp_)


class OfficialMoCo:
    """``MoCo.contrastive_loss`` and ``MoCo.forward`` (the momentum update left out: m = 1)."""

    def __init__(
        self, base_encoder, momentum_encoder, predictor, T: float, rank: int = 0, gather=None
    ) -> None:  # noqa: N803
        self.base_encoder, self.momentum_encoder, self.predictor, self.T = (
            base_encoder,
            momentum_encoder,
            predictor,
            T,
        )
        self.rank, self.gather = rank, gather or (lambda k: k)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        k = self.gather(k)  # concat_all_gather
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]  # noqa: N806
        labels = torch.arange(N, dtype=torch.long) + N * self.rank
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


def test_contrastive_loss_equals_the_official_one_with_the_rank_offset() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    other = torch.randn(6, 16, generator=g)  # another process's keys
    norm = nn.functional.normalize
    mine = contrastive_loss(q, norm(k, dim=1), 0, T)
    assert mine.shape == (6,)
    torch.testing.assert_close(mine.mean(), OfficialMoCo(None, None, None, T).contrastive_loss(q, k))
    for rank in (0, 1):  # two processes: this one's keys at its rank's place among every process's
        parts = [k, other] if rank == 0 else [other, k]
        official = OfficialMoCo(None, None, None, T, rank, lambda _k, p=parts: norm(torch.cat(p), dim=1))
        keys = norm(torch.cat(parts), dim=1)
        torch.testing.assert_close(
            contrastive_loss(q, keys, 6 * rank, T).mean(), official.contrastive_loss(q, k)
        )
    # the temperature's 2 tau factor: a query equal to its own key, far from the others, costs almost 0
    assert contrastive_loss(10 * norm(k, dim=1), norm(k, dim=1), 0, 0.01).max() < 1e-3


def test_heads_are_the_official_mlps() -> None:
    for layers, dims in ((3, (32, 64, 16)), (2, (16, 64, 16))):
        mine, official = mlp(layers, *dims), official_build_mlp(layers, *dims)
        assert [type(m) for m in mine] == [type(m) for m in official]
        assert [tuple(p.shape) for p in mine.parameters()] == [tuple(p.shape) for p in official.parameters()]
        assert all(m.bias is None for m in mine if isinstance(m, nn.Linear))
        assert not mine[-1].affine and all(m.affine for m in mine[:-1] if isinstance(m, nn.BatchNorm1d))


def test_the_step_loss_is_the_official_symmetric_forward() -> None:
    module = make_method("mocov3")
    module.train()
    (x1, x2), labels = views()
    with torch.no_grad():  # the momentum encoder apart from the online one, so the pairing shows
        for p in module.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = OfficialMoCo(
        lambda x: module.projector(module.encoder.features(x)),
        lambda x: module.target["projector"](module.target["encoder"].features(x)),
        module.predictor,
        T,
    )
    loss = module.training_step(([x1, x2], labels), 0)
    torch.testing.assert_close(loss, official.forward(x1, x2), atol=1e-5, rtol=1e-5)
    swapped = official.contrastive_loss(module.query(x1), module.keys(x1)) + official.contrastive_loss(
        module.query(x2), module.keys(x2)
    )
    assert (swapped - loss).abs() > 1e-3, "pairing each view's query with its own keys must differ"


_TWO_PROCESSES = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from advpt.methods.mocov3 import contrastive_loss, gather_keys
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g), torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    found = {}
    for name, cut in (("equal", 4), ("unequal", 3)):
        mine = slice(0, cut) if rank == 0 else slice(cut, 8)
        keys, offset = gather_keys(k[mine])
        found[name] = (contrastive_loss(q[mine], keys, offset, 0.2), offset, keys)
    torch.save(found, out)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # two fresh interpreters import torch: about 20 s on 2 busy cores
def test_two_processes_with_half_the_batch_each_give_the_loss_of_one(tmp_path: Path) -> None:
    """2 gloo processes, keys gathered: each example's loss as one process's with the whole batch (so the
    average of the two processes' means, DDP's, is the one-process mean), also with unequal halves."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TWO_PROCESSES,
                str(r),
                str(tmp_path / "store"),
                str(tmp_path / f"{r}.pt"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g), nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    assert gather_keys(k) == (k, 0)  # no process group: this process's keys
    one = contrastive_loss(q, k, 0, T)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    for name, cut in (("equal", 4), ("unequal", 3)):
        (loss0, offset0, keys0), (loss1, offset1, keys1) = (found[name] for found in ranks)
        assert (offset0, offset1) == (0, cut)
        torch.testing.assert_close(keys0, k, rtol=0, atol=0)
        torch.testing.assert_close(keys1, k, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([loss0, loss1]), one)
    (loss0, _, _), (loss1, _, _) = ranks[0]["equal"], ranks[1]["equal"]
    torch.testing.assert_close((loss0.mean() + loss1.mean()) / 2, one.mean())


# -- the attack -------------------------------------------------------------------------------------
def test_the_attack_perturbs_both_query_views_against_clean_fixed_keys(record_pgd, monkeypatch) -> None:
    module = make_method("mocov3", attack=L2)
    module.train()
    (x1, x2), labels = views()
    target = {k: v.clone() for k, v in module.target.state_dict().items()}
    seen = []
    real = module.keys
    monkeypatch.setattr(module, "keys", lambda x: seen.append(x) or real(x))
    loss = module.training_step(([x1, x2], labels), 0)
    (call,) = record_pgd
    assert len(seen) == 2 and seen[0] is x1 and seen[1] is x2, "keys once per view, on the clean views"
    assert isinstance(call["x"], tuple) and call["x"][0] is x1 and call["x"][1] is x2
    assert call["coupled"] is False  # with the keys fixed each example's loss reads its own views only
    assert all(d.flatten(1).norm(dim=1).min() > 0.1 for d in call["delta"]), "both views perturbed"
    for k, v in module.target.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, target[k]), k
    loss.backward()
    assert all(p.grad is None for p in module.target.parameters())


def test_each_examples_attacked_loss_reads_its_own_views_only(record_pgd) -> None:
    module = make_method("mocov3", attack=L2)
    module.train()
    module.training_step(views(), 0)
    (call,) = record_pgd
    x1, x2 = call["x"]
    module.eval()  # the attack's mode: batch norm on its running statistics
    with torch.no_grad():
        clean = call["loss_fn"]((x1, x2))
        other1, other2 = x1.clone(), x2.clone()
        other1[3], other2[5] = torch.rand_like(x1[3]), torch.rand_like(x2[5])
        changed = call["loss_fn"]((other1, other2))
    untouched = [i for i in range(8) if i not in (3, 5)]
    torch.testing.assert_close(changed[untouched], clean[untouched], atol=1e-6, rtol=1e-6)
    assert (changed[3] - clean[3]).abs() > 1e-4 and (changed[5] - clean[5]).abs() > 1e-4


def test_the_attack_leaves_every_weight_and_statistic_as_it_found_them(monkeypatch) -> None:
    module = make_method("mocov3", attack=L2)
    module.train()
    checked = []
    real = base.pgd

    def spy(loss_fn, x, attack, **kwargs):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        flags = {n: p.requires_grad for n, p in module.named_parameters()}
        delta = real(loss_fn, x, attack, **kwargs)
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert flags == {n: p.requires_grad for n, p in module.named_parameters()}
        assert all(m.training for m in module.modules())
        checked.append(sum("running_mean" in k for k in before))
        return delta

    monkeypatch.setattr(base, "pgd", spy)
    module.training_step(views(), 0)
    assert checked == [
        8
    ]  # batch norms: projector 3 + predictor 2 online, projector 3 in the momentum encoder


def test_the_attacked_loss_exceeds_the_clean_one(record_pgd) -> None:
    module = make_method("mocov3", attack={"norm": "linf", "eps": 8 / 255, "steps": 3})
    module.train()
    torch.manual_seed(1)
    module.training_step(views(16), 0)
    (call,) = record_pgd
    module.eval()
    with torch.no_grad():
        clean = call["loss_fn"](call["x"]).mean()
        attacked = call["loss_fn"](tuple(x + d for x, d in zip(call["x"], call["delta"], strict=True))).mean()
    assert attacked > clean


# -- the fixed patch projection and the momentum encoder ---------------------------------------------
@pytest.mark.parametrize("stop_grad", [True, False])
def test_the_patch_projection_is_a_fixed_random_layer_by_default(stop_grad: bool, tmp_path: Path) -> None:
    """Adversarial Lightning steps: with the option on (the default) the patch projection is neither
    optimised nor changed, while the blocks train; off, it trains as the rest."""
    import lightning as L
    from torch.utils.data import DataLoader

    assert load("method", "mocov3")["stop_grad_patch_embed"] is True
    module = make_method("mocov3", attack=L2, stop_grad_patch_embed=stop_grad, base_lr=0.04)
    proj, qkv = module.encoder.vit.patch_embed.proj, module.encoder.vit.blocks[0].attn.qkv
    assert proj.weight.requires_grad is not stop_grad and proj.bias.requires_grad is not stop_grad
    assert not module.encoder.vit.pos_embed.requires_grad  # vits.py's fixed sin-cos positions
    before = {"proj": proj.weight.clone(), "qkv": qkv.weight.clone()}
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader([views(seed=s) for s in range(2)], batch_size=None))
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert (id(proj.weight) in optimised) is not stop_grad
    assert proj.weight.requires_grad is not stop_grad  # the attack's frozen() gave the flag back
    assert torch.equal(proj.weight, before["proj"]) is stop_grad
    assert not torch.equal(qkv.weight, before["qkv"])
    if stop_grad:  # the momentum encoder's copy stays the same fixed layer
        torch.testing.assert_close(module.target["encoder"].vit.patch_embed.proj.weight, proj.weight)


def test_the_momentum_encoder_follows_encoder_and_projector() -> None:
    module = make_method("mocov3")
    with torch.no_grad():
        for p in [*module.encoder.parameters(), *module.projector.parameters()]:
            p.add_(1.0)
    online = [p.clone() for p in [*module.encoder.parameters(), *module.projector.parameters()]]
    teacher = [p.clone() for p in module.target.parameters()]
    module.update_target(0.9)
    for p_t, p_0, p_o in zip(module.target.parameters(), teacher, online, strict=True):
        torch.testing.assert_close(p_t, 0.9 * p_0 + 0.1 * p_o)
    assert load("method", "mocov3")["momentum"] == 0.99 and load("method", "mocov3")["temperature"] == T


# -- the CLI --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "attack", [["attack=none"], ["attack=l2", "eps=0.5", "attack.steps=2"]], ids=["none", "l2"]
)
def test_pretrain_runs_and_writes_a_timm_encoder(attack: list[str], tmp_path: Path) -> None:
    import timm

    from advpt.models import timm_kwargs

    run = tmp_path / "run"
    args = ["pretrain", "method=mocov3", "model=vit_micro", "monitor=none", "data.batch_size=8", *attack]
    args += ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    assert run_cli([*args, f"hydra.run.dir={run}"]) == 0
    weights = load_file(str(run / "encoder.safetensors"))
    model = load("model", "vit_micro")
    vit = timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
    vit.load_state_dict(weights)  # strict: a plain timm ViT, as fine-tuning loads it
    assert all(torch.isfinite(w).all() for w in weights.values())

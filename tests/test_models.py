"""The networks against MAE's reference: fixed sin-cos positions, initialisation, and what export carries."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load, mae_2d_sincos, make_method
from safetensors.torch import load_file
from torch import nn

from advpt.finetune import load_backbone
from advpt.methods.mae_parts import sincos_pos_embed
from advpt.models import Encoder


@pytest.mark.parametrize("dim,grid", [(32, 4), (768, 14), (512, 8)])
def test_sincos_pos_embed_is_maes(dim: int, grid: int) -> None:
    torch.testing.assert_close(sincos_pos_embed(dim, (grid, grid)), mae_2d_sincos(dim, grid))


def test_mae_encoder_and_decoder_positions_are_fixed_sincos(micro) -> None:
    from timm.optim import create_optimizer_v2

    module = make_method("mae")
    grid = micro["img_size"] // micro["patch_size"]
    expected = mae_2d_sincos(module.encoder.dim, grid)
    pos = module.encoder.vit.pos_embed
    torch.testing.assert_close(pos.detach(), expected)
    assert not pos.requires_grad
    torch.testing.assert_close(
        module.decoder.pos_embed, mae_2d_sincos(load("method", "mae")["decoder"]["32"]["dim"], grid)
    )
    # A training step moves the weights but not the positions.
    opt = create_optimizer_v2(module, opt="adamw", lr=1e-2, weight_decay=0.05)
    assert all(p is not pos for g in opt.param_groups for p in g["params"])
    qkv = module.encoder.vit.blocks[0].attn.qkv.weight.detach().clone()
    module.training_step(([torch.rand(8, 3, 16, 16)], torch.zeros(8)), 0).backward()
    opt.step()
    assert not torch.equal(module.encoder.vit.blocks[0].attn.qkv.weight, qkv)
    torch.testing.assert_close(module.encoder.vit.pos_embed.detach(), expected)


def test_exported_mae_encoder_carries_the_positions_into_fine_tuning(micro, tmp_path) -> None:
    module = make_method("mae")
    state = load_file(str(module.export_encoder(tmp_path)))
    expected = mae_2d_sincos(module.encoder.dim, micro["img_size"] // micro["patch_size"])
    torch.testing.assert_close(state["pos_embed"], expected)
    net = Encoder.from_config(micro, num_classes=10)
    load_backbone(net.vit, state)
    torch.testing.assert_close(net.vit.pos_embed.detach(), expected)
    assert net.vit.pos_embed.requires_grad  # fine-tuning may train them, as MAE's does


def _xavier_bound(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape[0], weight[0].numel()  # a conv counts as the linear layer it is
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_mae_initialisation_is_maes() -> None:
    torch.manual_seed(3)
    module = make_method("mae")
    for part in (module.encoder, module.decoder):
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
        assert linears
        for m in linears + [module.encoder.vit.patch_embed.proj]:
            bound = _xavier_bound(m.weight)
            w = m.weight.detach()
            assert w.abs().max() <= bound, m
            # xavier-uniform: std = bound / sqrt(3)
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), m
            if isinstance(m, nn.Linear):
                assert (m.bias == 0).all(), m
        for m in (m for m in part.modules() if isinstance(m, nn.LayerNorm)):
            assert m.eps == 1e-6 and (m.weight == 1).all() and (m.bias == 0).all(), m
    for token in (module.encoder.vit.cls_token, module.decoder.mask_token):
        assert 0.01 < token.std().item() < 0.035


@pytest.mark.parametrize("name", ["byol", "rotnet", "supervised"])
def test_other_methods_keep_timms_vit_with_learned_positions(name: str) -> None:
    # MAE's init and fixed positions belong to MAE; the other methods use timm's ViT as it comes.
    module = make_method(name)
    pos = module.encoder.vit.pos_embed
    assert pos.requires_grad
    assert not torch.allclose(pos.detach(), sincos_pos_embed(module.encoder.dim, module.encoder.grid_size))
    assert module.encoder.vit.cls_token.std() < 1e-3  # timm's class-token init, not MAE's N(0, 0.02)


def test_patch_embedding_as_a_matrix_product_equals_the_convolution_and_its_input_gradient() -> None:
    from advpt.models import PatchConv2d

    conv = nn.Conv2d(3, 16, kernel_size=4, stride=4)
    fast = PatchConv2d.replacing(conv)
    assert isinstance(fast, PatchConv2d) and fast.weight is conv.weight and fast.bias is conv.bias
    assert fast.state_dict().keys() == conv.state_dict().keys()
    x = torch.rand(5, 3, 16, 12, requires_grad=True)
    weights = torch.randn(5, 16, 4, 3)  # a loss that weighs every output differently
    (grad_conv,) = torch.autograd.grad((conv(x) * weights).sum(), x)
    (grad_fast,) = torch.autograd.grad((fast(x) * weights).sum(), x)
    torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_fast, grad_conv, atol=1e-5, rtol=1e-5)
    # anything but a patch embedding stays a convolution
    assert PatchConv2d.replacing(overlapping := nn.Conv2d(3, 8, 3, stride=2)) is overlapping


@pytest.mark.parametrize("name", ["mae", "supervised"])
def test_the_attack_through_the_matrix_product_embedding_finds_the_convolutions_perturbation(
    name: str,
) -> None:
    # The same method, once with the embedding advpt builds and once with timm's convolution
    # holding the same weights: the same random draws give the same perturbation.
    import advpt.methods.base as base
    from advpt.models import PatchConv2d

    method = make_method(name, attack={"norm": "l2", "eps": 0.5, "steps": 2}, mixup=0.0, cutmix=0.0)
    embed = method.encoder.vit.patch_embed
    assert isinstance(embed.proj, PatchConv2d)
    batch = ([torch.rand(8, 3, 16, 16)], torch.randint(0, 10, (8,)))
    deltas = []
    real = base.pgd

    def keep(*args, **kwargs):
        deltas.append(real(*args, **kwargs))
        return deltas[-1]

    for proj in (
        embed.proj,
        nn.Conv2d(3, embed.proj.out_channels, embed.proj.kernel_size, embed.proj.stride),
    ):
        if not isinstance(proj, PatchConv2d):
            proj.weight, proj.bias = embed.proj.weight, embed.proj.bias
        embed.proj = proj
        torch.manual_seed(1)
        base.pgd = keep
        try:
            method.training_step(batch, 0)
        finally:
            base.pgd = real
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-5, rtol=1e-4)


def test_buffered_drop_path_keeps_each_sample_with_its_rate_and_scales_by_it() -> None:
    from advpt.models import DropPathBuffer

    x = torch.ones(20_000, 3, 4)
    layer = DropPathBuffer(0.3).train()
    y = layer(x)
    per_sample = y[:, 0, 0]
    kept = per_sample != 0
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.7))  # scaled by keep
    assert torch.equal(y, per_sample.view(-1, 1, 1).expand_as(y))  # one draw per sample, as timm's
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(DropPathBuffer(0.0).train()(x), x)
    assert "rate" not in layer.state_dict()  # the state dict stays timm's


def test_compiled_blocks_share_one_graph_whatever_the_depth(micro) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from advpt.models import buffered_drop_path

    def graphs(depth: int) -> int:
        torch._dynamo.reset()
        counters.clear()
        encoder = Encoder.from_config(
            {**micro, "kwargs": {**micro["kwargs"], "depth": depth}}, drop_path_rate=0.2
        )
        for block in encoder.vit.blocks:  # as compile=true does (BaseMethod.configure_model)
            buffered_drop_path(block)
            block.compile(backend="eager")
        x = torch.rand(4, 3, 16, 16)
        encoder.train()(x).sum().backward()
        with torch.no_grad():
            encoder.eval()(x)
        return int(counters["stats"]["unique_graphs"])

    shallow, deep = graphs(2), graphs(5)
    assert shallow == deep and shallow <= 3  # train and eval: one graph each, for every block

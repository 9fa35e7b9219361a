"""Published weights in: the official MAE release's layout (``.pth``) and ``timm:NAME``, for
``finetune pretrained=`` and ``pretrain init=``; each checked against a model built from the same
weights directly. No network: the releases are written here, timm's hub is a local cache."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from helpers import load, make_method, one_line, run_cli
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, PatchEmbed
from torch import Tensor, nn

from advpt.config import compose
from advpt.errors import UserError
from advpt.finetune import FineTuner, check
from advpt.finetune.pretrained import load_published
from advpt.methods.mae_parts import sincos_pos_embed
from advpt.models import Encoder
from advpt.pretrain import check_init, load_init
from advpt.published import advpt_names

FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
TINY = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, decoder=(128, 2, 4, 4.0))
MICRO = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder=(32, 1, 2, 2.0))


class OfficialMAE(nn.Module):
    """facebookresearch/mae's ``MaskedAutoencoderViT`` (models_mae.py): its attributes, hence its
    state-dict names, and its forward, transcribed; random weights, norms included."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder=None) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n, grid = self.patch_embed.num_patches, self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid), requires_grad=False)
        block = partial(Block, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
        self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        if decoder is not None:  # the visualisation releases; mae_pretrain_vit_*.pth have none
            dim, dec_depth, heads, mlp_ratio = decoder
            self.decoder_embed = nn.Linear(embed_dim, dim)
            self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dim, grid), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [block(dim, heads, mlp_ratio=mlp_ratio) for _ in range(dec_depth)]
            )
            self.decoder_norm = norm_layer(dim)
            self.decoder_pred = nn.Linear(dim, patch_size**2 * 3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.2), m.bias.normal_(0.0, 0.2)
        assert n == grid[0] * grid[1]

    def forward_encoder(self, x: Tensor, ids_shuffle: Tensor, len_keep: int) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


def release(path: Path, arch: dict, decoder: bool = True, **extra) -> tuple[Path, OfficialMAE]:
    """An MAE release file, ``{'model': state_dict}``, as facebookresearch/mae saves it."""
    mae = OfficialMAE(**{**arch, "decoder": arch["decoder"] if decoder else None}).eval()
    torch.save({"model": mae.state_dict(), **extra}, path)
    return path, mae


def micro_vit(**kwargs) -> nn.Module:
    """A plain timm ViT of vit_micro's architecture."""
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **kwargs
    ).eval()


def finetuner(cfg) -> FineTuner:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return FineTuner(model, load("optim", "adamw_lld"), 10).eval()


def encoder_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}


# -- the release's names ----------------------------------------------------------------------------
def test_release_names_are_advpt_names_with_norm_as_fc_norm(tmp_path: Path) -> None:
    _, mae = release(tmp_path / "mae.pth", MICRO)
    weights = advpt_names(mae.state_dict())
    encoder = Encoder.from_config(load("model", "vit_micro"))
    assert list(weights.encoder) == [k for k in encoder.vit.state_dict()]  # same names, same order
    assert torch.equal(weights.encoder["fc_norm.weight"], mae.norm.weight)
    assert "decoder_pos_embed" not in weights.decoder and "pos_embed" not in weights.decoder
    assert torch.equal(weights.decoder["blocks.0.attn.qkv.weight"], mae.decoder_blocks[0].attn.qkv.weight)
    assert torch.equal(weights.decoder["pred.bias"], mae.decoder_pred.bias)


# -- finetune pretrained=<release> ----------------------------------------------------------------
def test_finetune_from_a_release_computes_what_the_release_computes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path, mae = release(tmp_path / "mae_pretrain.pth", MICRO, decoder=False)
    cfg = check(compose("finetune", [f"pretrained={path}", "model=vit_micro"]), touch_data=False)
    assert cfg.pretrained == str(path) and cfg.model.img_size == 16
    module = finetuner(cfg)
    assert load_published(module.vit, cfg.pretrained, cfg.model) == []  # nothing resampled

    reference = micro_vit(num_classes=0)  # timm's ViT (token pooling: the per-token norm of MAE)
    reference.load_state_dict(mae.state_dict())  # strict: the release is in timm's names
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = reference.forward_features(module.net.normalize(x))
        tokens = module.vit.fc_norm(module.vit.forward_features(module.net.normalize(x)))
        torch.testing.assert_close(tokens, expected)
        everything = torch.arange(16).expand(4, -1)
        torch.testing.assert_close(module.net.visible_tokens(x, everything), expected)


def test_a_fine_tuned_release_keeps_its_fc_norm_and_drops_its_head(tmp_path: Path) -> None:
    reference = micro_vit(num_classes=7, global_pool="avg")  # models_vit.py with global_pool: fc_norm
    torch.save({"model": reference.state_dict()}, tmp_path / "mae_finetuned.pth")
    cfg = check(
        compose("finetune", [f"pretrained={tmp_path / 'mae_finetuned.pth'}", "model=vit_micro"]),
        touch_data=False,
    )
    module = finetuner(cfg)
    load_published(module.vit, cfg.pretrained, cfg.model)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(module.net.normalize(x)), True)
        torch.testing.assert_close(module.net.features(x), features)
    assert module.vit.head.weight.shape == (10, 32)


def test_another_image_size_resamples_only_the_position_embedding(tmp_path: Path) -> None:
    path, mae = release(tmp_path / "mae.pth", MICRO)
    cfg = check(
        compose("finetune", [f"pretrained={path}", "model=vit_micro", "model.img_size=32"]), touch_data=False
    )
    module = finetuner(cfg)
    notes = load_published(module.vit, cfg.pretrained, cfg.model)
    assert notes == [
        f"resampled the position embedding of pretrained={path} from 4x4 to 8x8 patches (img_size=32); "
        "every other weight as it is"
    ]
    state = module.vit.state_dict()
    expected = resample_abs_pos_embed(mae.pos_embed, [8, 8], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(state["pos_embed"], expected)
    for k, v in advpt_names(mae.state_dict()).encoder.items():
        assert k == "pos_embed" or torch.equal(state[k], v), k


# -- pretrain init=<release> ------------------------------------------------------------------------
def test_adversarial_mae_continues_the_release_encoder_and_decoder(tmp_path: Path) -> None:
    path, mae = release(tmp_path / "mae_visualize.pth", MICRO)
    model = load("model", "vit_micro")
    source = check_init(path, model, load("method", "mae"))
    module = make_method("mae").eval()
    assert load_init(module, source, model) == [f"loaded the encoder and the MAE decoder of init={path}"]

    images = torch.rand(4, 3, 16, 16)
    ids_shuffle = torch.rand(4, 16).argsort(dim=1)
    with torch.no_grad():
        latent = mae.forward_encoder(module.encoder.normalize(images), ids_shuffle, 4)
        expected = mae.forward_decoder(latent, ids_shuffle.argsort(dim=1))
        torch.testing.assert_close(module.reconstruct(images, ids_shuffle[:, :4]), expected)
    assert not module.encoder.vit.pos_embed.requires_grad  # MAE's positions stay fixed


def test_init_loads_every_copy_of_the_encoder_and_says_when_the_decoder_starts_fresh(tmp_path: Path) -> None:
    path, mae = release(tmp_path / "mae_pretrain.pth", MICRO, decoder=False)
    model = load("model", "vit_micro")
    expected = advpt_names(mae.state_dict()).encoder
    for name, copies in (("byol", ["encoder", "target.encoder"]), ("supervised", ["encoder", "ema.module"])):
        module = make_method(name)
        assert load_init(module, check_init(path, model, load("method", name)), model) == [
            f"loaded the encoder of init={path}"
        ]
        for copy in copies:
            state = module.get_submodule(copy).vit.state_dict()
            assert all(torch.equal(state[k], v) for k, v in expected.items()), (name, copy)
    module = make_method("mae")
    fresh = {k: v.clone() for k, v in module.decoder.state_dict().items()}
    assert load_init(module, str(path), model) == [
        f"loaded the encoder of init={path}; it has no MAE decoder: the decoder starts fresh"
    ]
    assert all(torch.equal(v, fresh[k]) for k, v in module.decoder.state_dict().items())


def test_pretrain_init_runs_from_the_command_line(tmp_path: Path, capsys) -> None:
    path, _ = release(tmp_path / "mae_pretrain.pth", MICRO, decoder=False)
    run_dir = tmp_path / "run"
    args = ["pretrain", f"init={path}", "model=vit_micro", "trainer.max_steps=1", f"hydra.run.dir={run_dir}"]
    assert run_cli([*args, *FAST]) == 0
    assert "the decoder starts fresh" in capsys.readouterr().out
    assert OmegaConf.load(run_dir / "config.yaml").init == str(path)
    assert (run_dir / "encoder.safetensors").is_file()


# -- what does not fit ----------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    release(folder / "tiny.pth", TINY)
    release(folder / "micro.pth", MICRO)
    release(folder / "wide_decoder.pth", {**MICRO, "decoder": (64, 1, 2, 2.0)})
    release(folder / "args.pth", MICRO, args=argparse.Namespace(lr=1e-3, epochs=800))
    torch.save({"optimizer": {"lr": 1.0}}, folder / "other.pth")
    return folder


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["finetune", "pretrained=FILES/tiny.pth", "model=vit_micro"],
            "pretrained=FILES/tiny.pth does not fit the model vit_tiny_patch16_224 (16 px, patch 4, width 32, "
            "depth 2): its cls_token has shape [1, 1, 192], the model's [1, 1, 32]; choose the model= it was made for",
        ),
        (
            ["finetune", "pretrained=FILES/micro.pth", "model=vit_micro", "model.patch_size=8"],
            "its patch_embed.proj.weight has shape [32, 3, 4, 4], the model's [32, 3, 8, 8]",
        ),
        (
            ["finetune", "pretrained=FILES/micro.pth", "model=vit_micro", "model.kwargs.depth=3"],
            "it has no blocks.2.norm1.weight",
        ),
        (
            ["finetune", "pretrained=FILES/micro.pth"],
            "holds weights without their architecture: name it with model=",
        ),
        (
            ["finetune", "pretrained=FILES/args.pth", "model=vit_micro"],
            "holds Python objects beyond tensors and plain values (it needs the Python global argparse.Namespace)",
        ),
        (["finetune", "pretrained=FILES/other.pth", "model=vit_micro"], "is not in the MAE release layout"),
        (
            ["finetune", "pretrained=FILES/none.pth", "model=vit_micro"],
            "pretrained=FILES/none.pth does not exist",
        ),
        (["finetune", "pretrained=timm:vit_nonexistent_9"], "timm has no model 'vit_nonexistent_9'"),
        (
            ["pretrain", "init=FILES/tiny.pth", "model=vit_micro"],
            "init=FILES/tiny.pth does not fit the model",
        ),
        (
            ["pretrain", "init=FILES/wide_decoder.pth", "model=vit_micro"],
            "has an MAE decoder that does not fit method.decoder's at width 32 ({'dim': 32, 'depth': 1, "
            "'heads': 2, 'mlp_dim': 64}): its mask_token has shape [1, 1, 64], the model's [1, 1, 32]; "
            "set method.decoder.32.* to the one it was made with",
        ),
        (["pretrain", "init=FILES", "model=vit_micro"], "is not an MAE release .pth, timm:NAME"),
    ],
)
def test_what_does_not_fit_is_one_line_exit_2_and_writes_nothing(
    args, needle, files: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = [a.replace("FILES", str(files)) for a in args]
    assert run_cli([*args, *FAST]) == 2
    err = capsys.readouterr().err
    one_line(err, args[0], needle.replace("FILES", str(files)))
    assert list(cwd.iterdir()) == []


def test_the_wide_decoder_is_no_concern_of_methods_without_one(files: Path) -> None:
    model = load("model", "vit_micro")
    assert check_init(files / "wide_decoder.pth", model, load("method", "byol")) == str(
        files / "wide_decoder.pth"
    )


# -- timm:NAME, from a local Hugging Face cache ---------------------------------------------------------
TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> dict[str, Tensor]:
    """``TIMM_NAME``'s weights (random) in a Hugging Face cache laid out as a download leaves it; offline."""
    import huggingface_hub.constants

    model = timm.create_model(TIMM_NAME, pretrained=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    repo = tmp_path / "hub" / f"models--timm--{TIMM_NAME}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return state


def test_timm_name_loads_timms_weights_offline_from_the_cache(hub: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = check(compose("finetune", [f"pretrained=timm:{TIMM_NAME}"]), touch_data=False)
    assert cfg.pretrained == f"timm:{TIMM_NAME}"  # the model is timm's own
    assert (cfg.model.name, cfg.model.img_size, cfg.model.patch_size) == ("vit_tiny_patch16_224", 224, 16)

    # The same weights in vit_tiny_patch4_32 with 16-pixel patches: 2x2 patches instead of 14x14.
    overrides = ["model=vit_tiny_patch4_32", "model.patch_size=16"]
    cfg = check(compose("finetune", [f"pretrained=timm:{TIMM_NAME}", *overrides]), touch_data=False)
    module = finetuner(cfg)
    assert load_published(module.vit, cfg.pretrained, cfg.model) == [
        f"resampled the position embedding of pretrained=timm:{TIMM_NAME} from 14x14 to 2x2 patches "
        "(img_size=32); every other weight as it is"
    ]
    loaded = module.vit.state_dict()
    downloaded = timm.create_model(TIMM_NAME, pretrained=True).state_dict()  # what timm itself reads
    for k, v in hub.items():
        assert torch.equal(downloaded[k], v), k
        if k.startswith("blocks.") or k == "cls_token":
            assert torch.equal(loaded[k], v), k
    assert torch.equal(loaded["fc_norm.weight"], hub["norm.weight"])
    expected = resample_abs_pos_embed(hub["pos_embed"], [2, 2], [14, 14], num_prefix_tokens=1)
    torch.testing.assert_close(loaded["pos_embed"], expected)


def test_timm_weights_missing_from_the_cache_are_one_line(hub: dict) -> None:
    vit = Encoder.from_config(load("model", "vit_tiny_patch4_32")).vit
    with pytest.raises(UserError) as e:
        load_published(
            vit, "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", load("model", "vit_tiny_patch4_32")
        )
    assert "timm could not load its weights (LocalEntryNotFoundError" in str(e.value)
    assert "\n" not in str(e.value)


# -- the done-when ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_release_fine_tunes_in_its_model_and_is_refused_by_another(
    files: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    pth = files / "tiny.pth"
    run_dir = tmp_path / "run"
    args = ["finetune", f"pretrained={pth}", "model=vit_tiny_patch4_32", "trainer.max_steps=3"]
    assert run_cli([*args, f"hydra.run.dir={run_dir}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "advpt finetune: loaded encoder files/tiny.pth (vit_tiny_patch16_224, 32 px, patch 4)" in out
    assert (run_dir / "model.safetensors").is_file()

    assert run_cli(["finetune", f"pretrained={pth}", "model=vit_micro", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "does not fit the model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files", "run"]  # no run folder

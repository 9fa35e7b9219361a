"""The command line: every bad input is one line and exit 2; every method x attack runs and writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_cli

from advpt.method_table import METHOD_TABLE

FAST = [
    "model=vit_micro",
    "trainer.max_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["method=foo"], "unknown method option 'foo'; choose one of: " + ", ".join(sorted(METHOD_TABLE))),
        (["attack=l3"], "unknown attack option 'l3'"),
        (["foo=1"], "unknown key 'foo'"),
        (["trainer.not_an_argument=1"], "unknown key 'trainer.not_an_argument'"),
        (["trainer={max_steps:1,bogus:1}"], "trainer has no key 'bogus': add it with +trainer.bogus=VALUE"),
        (["+trainer.not_an_argument=1"], "not a Lightning Trainer argument"),
        (["eps=-0.1"], "eps=-0.1 is out of range"),
        (["attack=linf", "eps=4"], "not a valid l_inf radius"),
        (["eps=abc"], "is not a number"),
        (["attack.steps=0"], "attack.steps=0 is invalid"),
        (["data=imagefolder", "data.root=/does/not/exist"], "data.root=/does/not/exist does not exist"),
        (["data=imagefolder"], "needs data.root=PATH"),
        (["method=mae,byol"], "add -m"),
        (["-m", "method=mae,nope"], "unknown method option 'nope'"),
        (["resume=/no/such.ckpt"], "resume=/no/such.ckpt is not a checkpoint"),
        # every numeric hyper-parameter is range-checked up front
        (["method.base_lr=-1"], "method.base_lr=-1 is out of range: expected a number > 0"),
        (["method.weight_decay=-0.1"], "method.weight_decay=-0.1 is out of range: expected a number >= 0"),
        (["method.betas=[0.9,1.5]"], "method.betas=[0.9,1.5] is out of range: expected each item"),
        (
            ["method.warmup_fraction=1"],
            "method.warmup_fraction=1 is out of range: expected a number in [0, 1)",
        ),
        (["method.min_lr=-1"], "method.min_lr=-1 is out of range"),
        (["method.mask_ratio=1"], "method.mask_ratio=1 is out of range: expected a number in (0, 1)"),
        (["method=byol", "method.momentum=1.5"], "method.momentum=1.5 is out of range"),
        (["method=supervised", "method.ema_decay=1"], "method.ema_decay=1 is out of range"),
        (["method=supervised", "method.label_smoothing=-0.1"], "method.label_smoothing=-0.1 is out of range"),
        (["method=supervised", "method.drop_path_rate=1"], "method.drop_path_rate=1 is out of range"),
        (["method=supervised", "method.mixup=-1"], "method.mixup=-1 is out of range"),
        (["method.views.crop_scale=[0,1]"], "method.views.crop_scale=[0,1] is out of range"),
        (["data.batch_size=0"], "data.batch_size=0 is invalid: expected an integer >= 1"),
        (["data.batch_size=1.5"], "data.batch_size=1.5 is invalid"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid: expected an integer >= 1 (or -1 or null)"),
        (["trainer.max_epochs=-2"], "trainer.max_epochs=-2 is invalid"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is invalid"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is out of range"),
        (["seed=-1"], "seed=-1 is invalid: expected an integer >= 0"),
        (["model.name=vit_nonexistent"], "model.name=vit_nonexistent is not a timm model"),
        (["model.name=vit_smal_patch16_224"], "closest: vit_small_patch16_224,"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, needle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "pretrain", needle)
    assert list(tmp_path.iterdir()) == []


def test_cifar_absent_and_offline_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import urllib.error

    from torchvision.datasets import CIFAR10

    def offline(self) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["pretrain", "data=cifar10", "data.root=cifar"]) == 2
    err = capsys.readouterr().err
    one_line(err, None, "cifar10 is not under data.root=cifar")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_imagefolder_tree_pretrains(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(4):
            colour = (40 * i, 200 if label == "cat" else 20, 90)
            Image.new("RGB", (20 + i, 18), colour).save(tmp_path / "tree" / label / f"{i}.png")
    run_dir = tmp_path / "run"
    args = [
        "pretrain",
        "method=supervised",
        "data=imagefolder",
        f"data.root={tmp_path / 'tree'}",
        "data.batch_size=4",
    ]
    assert run_cli([*args, "data.num_workers=0", *FAST, f"hydra.run.dir={run_dir}"]) == 0
    assert (run_dir / "encoder.safetensors").is_file()


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_keeps_its_run_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    run_dir = tmp_path / "run"
    assert run_cli(["pretrain", "logger=wandb", *FAST, f"hydra.run.dir={run_dir}"]) == 0
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id and any(run_dir.glob(f"wandb/offline-run-*-{run_id}"))
    resumed = tmp_path / "resumed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (
        run_cli(
            [
                "pretrain",
                "logger=wandb",
                *FAST,
                "trainer.max_steps=2",
                f"resume={ckpt}",
                f"hydra.run.dir={resumed}",
            ]
        )
        == 0
    )
    assert (resumed / "wandb_id.txt").read_text().strip() == run_id  # the same wandb run continues


@pytest.mark.slow
def test_tensorboard_logger_gets_metrics_and_figures(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert run_cli(["pretrain", "logger=tensorboard", *FAST, f"hydra.run.dir={run_dir}"]) == 0
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    images = set(acc.Tags()["images"])
    assert any("adversarial_examples" in t for t in images) and any(
        "mae_reconstructions" in t for t in images
    )


def test_help_and_bad_input_import_nothing_heavy(tmp_path: Path) -> None:
    """--help and a bad value answer before torch, Lightning or timm are imported (seconds each)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from advpt.cli import main\n"
        "for args in (['pretrain', '--help'], ['finetune', '--help'], ['pretrain', 'method.base_lr=-1'],\n"
        "             ['pretrain', 'method=foo'], ['finetune', 'optim.lr=0'], ['evaluate', 'robust.steps=0'],\n"
        "             ['pretrain', '+trainer.not_an_argument=1'], ['finetune', 'pretrained=latest'],\n"
        "             ['pretrain', 'trainer.accelerator=cpu', 'trainer.devices=64', 'trainer.strategy=ddp']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("error: ") == 7, done.stderr
    assert "trainer.devices=64 would start 64 CPU processes" in done.stderr


def test_help_lists_the_commands_own_groups_and_option_names(capsys) -> None:
    assert run_cli(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: advpt pretrain ")
    listed = out.split("== Groups")[1].split("== Config")[0].splitlines()[1:]
    groups = {line.split(":")[0]: line for line in listed if ": " in line}
    assert set(groups) == {"attack", "data", "logger", "method", "model", "monitor", "recipe", "trainer"}
    assert "vit_tiny_patch4_32" in groups["model"] and "mae*" in groups["method"]
    assert "knn*" in groups["monitor"] and "none" in groups["monitor"]
    assert run_cli(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("== Groups")[1].split("== Config")[0].splitlines()[1:]
    groups = {line.split(":")[0] for line in listed if ": " in line}
    assert groups == {"data", "logger", "model", "optim", "recipe", "trainer"}


@pytest.mark.parametrize(
    "command,overrides,name",
    [
        (
            "pretrain",
            ["method=mae", "attack=linf", "eps=4/255", "trainer.enable_progress_bar=false", "resume=auto"],
            "0-attack-linf+eps-4_255+method-mae",
        ),
        ("finetune", ["layer_decay=0.65", "data.num_workers=2"], "0-layer_decay-0.65"),
        ("evaluate", ["suite=auto", "robust.steps=3", "num_workers=0"], "0-robust.steps-3+suite-auto"),
    ],
)
def test_sweep_folders_name_every_swept_value(command: str, overrides: list[str], name: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    import advpt.cli  # noqa: F401  (registers the resolvers, as a launcher's job process does)
    from advpt.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=command):
        cfg = compose(command, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == name


def test_noise_is_silenced_and_real_warnings_stay(caplog) -> None:
    import logging
    import warnings

    from advpt.quiet import silence_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("The number of training batches (2) is smaller than the logging interval", stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging")
        logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").info(
            "`weights_only` was not set, defaulting to `False`."
        )
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("a real note")
    assert [r.getMessage() for r in caplog.records] == ["a real note"]


@pytest.mark.slow
def test_a_short_epoch_run_ends_with_a_summary_and_writes_metrics(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """One epoch of 2 batches at the default logging interval (5): metrics.csv still has the final step."""
    import csv

    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "model=vit_micro", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    assert run_cli([*args, "trainer.enable_progress_bar=false", "monitor=none"]) == 0
    (run_dir,) = (tmp_path / "outputs" / "pretrain" / "mae-l2").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "1")] and float(rows[0]["train/loss"]) > 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["steps"] == 2 and record["loss"] == pytest.approx(float(rows[0]["train/loss"]))
    rel = run_dir.relative_to(tmp_path)
    assert capsys.readouterr().out.strip().splitlines()[-4:] == [
        f"advpt pretrain: 2 steps, final train/loss {record['loss']:.4f}",
        "  attack: l2 0.5 at 16 px (the paper's 7 at 224 px)",  # the default radius, in both units
        f"  run:  {rel}",
        f"  next: advpt finetune pretrained={rel}",
    ]


def test_unknown_command_and_usage(capsys) -> None:
    assert run_cli(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert run_cli(["--help"]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_cfg_job_prints_the_composed_config(capsys) -> None:
    assert run_cli(["pretrain", "method=byol", "attack=linf", "eps=2/255", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "name: byol" in out and "eps: 2/255" in out


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["none", "linf", "l2"])
@pytest.mark.parametrize("method", list(METHOD_TABLE))
def test_one_step_run_writes_its_outputs(method: str, attack: str, tmp_path: Path) -> None:
    import csv

    import timm
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    eps = {"none": [], "linf": ["eps=2/255"], "l2": ["eps=0.5"]}[attack]
    assert (
        run_cli(["pretrain", f"method={method}", f"attack={attack}", *eps, *FAST, f"hydra.run.dir={run_dir}"])
        == 0
    )

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 1 and "optimizer_states" in ckpt
    if method == "mae":
        assert any(k.startswith("decoder.") for k in ckpt["state_dict"])  # reconstructions stay possible

    spec = json.loads((run_dir / "encoder.json").read_text())
    vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    vit.load_state_dict(load_file(run_dir / "encoder.safetensors"))  # strict: every key matches by name

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.method.name == method and cfg.attack.name == attack
    if attack == "linf":
        assert cfg.eps == pytest.approx(2 / 255)

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns = set(rows[0]) if rows else set()
    assert {"train/loss", "train/images_per_s"} <= columns
    if attack != "none":
        assert {"train/loss_clean", "train/loss_attacked", "train/delta_norm"} <= columns
        norms = [float(r["train/delta_norm"]) for r in rows if r["train/delta_norm"]]
        bound = 2 / 255 if attack == "linf" else 0.5
        assert norms and all(0 < n <= bound + 1e-6 for n in norms)
        # both measured in eval mode on the same batch: the attack raised the loss (rows of monitor=knn aside)
        for row in (r for r in rows if r["train/loss"]):
            assert float(row["train/loss_attacked"]) > float(row["train/loss_clean"]), row


@pytest.mark.slow
def test_multirun_sweep_as_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "-m", "method=mae,rotnet", "attack=linf", "eps=1/255,4/255", *FAST]
    assert run_cli(args) == 0
    configs = sorted(c for c in tmp_path.glob("multirun/**/config.yaml") if ".hydra" not in c.parts)
    assert len(configs) == 4
    from omegaconf import OmegaConf

    seen = {(OmegaConf.load(c).method.name, round(OmegaConf.load(c).eps * 255)) for c in configs}
    assert seen == {("mae", 1), ("mae", 4), ("rotnet", 1), ("rotnet", 4)}


@pytest.mark.slow
@pytest.mark.parametrize("method,attack", [("mae", "l2"), ("byol", "linf")])
def test_resumed_run_equals_uninterrupted_run(method: str, attack: str, tmp_path: Path, monkeypatch) -> None:
    import signal

    from safetensors.torch import load_file

    from advpt.methods.base import PretrainMethod

    common = [
        "pretrain",
        f"method={method}",
        f"attack={attack}",
        "model=vit_micro",
        "trainer.limit_train_batches=2",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "data.batch_size=16",
    ]
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    assert run_cli([*common, f"hydra.run.dir={full}"]) == 0

    # Kill the same run at the start of its second epoch, after the first epoch's checkpoint was written.
    start_epoch = PretrainMethod.on_train_epoch_start

    def kill_at_epoch_1(self) -> None:
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        start_epoch(self)

    with monkeypatch.context() as m:
        m.setattr(PretrainMethod, "on_train_epoch_start", kill_at_epoch_1)
        assert run_cli([*common, f"hydra.run.dir={killed}"]) != 0
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after an interrupt
    assert not (killed / "encoder.safetensors").exists()

    assert (
        run_cli([*common, f"resume={killed / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed}"]) == 0
    )
    a, b = load_file(full / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    c = {k[len("encoder.vit.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.vit.")}
    assert any(not torch.equal(a[k], c[k]) for k in a), "the second epoch must change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_clean_loss_is_measured_on_the_steps_lightning_logs(tmp_path: Path, monkeypatch) -> None:
    """The clean-loss diagnostic runs exactly on the steps whose metrics Lightning writes, never stale."""
    import csv

    from advpt.methods.mae import MAE

    agree = []
    step = MAE.training_step

    def spy(self, batch, batch_idx):
        agree.append(self._logging_step() == self.trainer._logger_connector.should_update_logs)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MAE, "training_step", spy)
    run_dir = tmp_path / "run"
    args = ["pretrain", "method=mae", "attack=l2", "eps=1.0", "model=vit_micro", "data.batch_size=32"]
    extra = ["trainer.max_steps=12", "trainer.log_every_n_steps=3", "trainer.enable_progress_bar=false"]
    assert run_cli([*args, *extra, f"hydra.run.dir={run_dir}"]) == 0
    assert len(agree) == 12 and all(agree)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    rows = [r for r in rows if r["train/loss"]]  # the training rows, not monitor=knn's
    assert len(rows) == 4
    for row in rows:  # same batch and mask: the attack shows in every row
        assert float(row["train/loss_clean"]) < float(row["train/loss_attacked"]), row


def _tree(root: Path, split: str, classes: tuple[str, ...]) -> None:
    from PIL import Image

    for label in classes:
        (root / split / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(label) * 40, 90, 30)).save(root / split / label / "0.png")


def test_a_held_out_split_is_numbered_by_the_training_split_s_class_names(tmp_path: Path) -> None:
    from advpt.data.sources import build_source

    _tree(tmp_path, "train", ("a", "b", "c"))
    _tree(tmp_path, "val", ("a", "c"))  # b absent: c keeps train/'s number 2, not val/'s own 1
    held_out = build_source({"name": "imagefolder", "root": str(tmp_path)}, train=False)
    assert held_out.classes == ["a", "b", "c"]
    assert sorted(held_out.targets) == [0, 2]


def test_a_held_out_class_the_training_split_lacks_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _tree(tmp_path / "data", "train", ("a", "b"))
    _tree(tmp_path / "data", "val", ("a", "z"))  # torchvision alone would score z as b
    monkeypatch.chdir(tmp_path)
    code = run_cli(["finetune", "pretrained=none", "data=imagefolder", f"data.root={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    one_line(err, None, "val/ has classes train/ lacks: z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_error_line_comes_after_the_last_redraw_of_an_open_progress_bar(capsys) -> None:
    import tqdm

    from advpt.cli import fail

    bar = tqdm.tqdm(total=10, desc="Epoch 0")  # what a run that fails mid-epoch leaves open
    bar.update(3)
    with pytest.raises(SystemExit) as stopped:
        fail("cannot write last.ckpt: no space left on device", "pretrain", 74)
    assert stopped.value.code == 74 and bar.disable is True  # closed, so nothing is redrawn at exit
    err = capsys.readouterr().err
    assert err.endswith("advpt pretrain: error: cannot write last.ckpt: no space left on device\n"), err

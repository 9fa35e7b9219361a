"""The proof that a method is its module, its config and its table entry: a toy method defined here, and
nothing else in the package changed, is pre-trained nominally and adversarially by ``advpt pretrain``,
planned and ordered by the study and drawn by the report under its own label and colour."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_chain, one_line, run_cli
from omegaconf import open_dict
from torch import Tensor, nn

from advpt.method_table import METHOD_TABLE, Method
from advpt.methods.base import PretrainMethod


class Toy(PretrainMethod):
    """Predict each image's mean colour from the encoder's pooled features (squared error)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = nn.Linear(self.encoder.dim, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (images,), _labels = batch
        target = images.mean(dim=(2, 3))  # of the clean images: the attack moves the input, not the target

        def loss_fn(x: Tensor) -> Tensor:
            return (self.head(self.encoder.features(x)) - target).pow(2).mean(dim=1)

        x = self.attacked(loss_fn, images)
        loss = self.reduce(loss_fn(x))
        self.log_loss(loss, images.shape[0])
        return loss


LABEL, COLOUR, COST = "Toy-PT", "tab:olive", 5.0
# Its config, as conf/method/toy.yaml and its recipes would hold it: here in a folder of the test's own that
# Hydra is pointed at (hydra.searchpath), so that nothing is copied into the package.
CONFIGS = {
    "method/toy.yaml": (
        "name: toy\nviews: {kind: toy}\nbase_lr: 1.0e-3\nweight_decay: 0.0\nbetas: [0.9, 0.95]\n"
        "warmup_fraction: 0.0\nmin_lr: 0.0\n"
    ),
    "recipe/pretrain/cpu_toy.yaml": "# @package _global_\ntrainer: {max_epochs: 2, max_steps: -1}\n",
    "recipe/pretrain/paper_toy.yaml": "# @package _global_\ntrainer: {max_epochs: 100, max_steps: -1}\n",
}
RUN = [
    "model=vit_micro",
    "data.batch_size=16",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "monitor=none",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Toy's table entry (for this module's tests) and its config folder; yields the searchpath override."""
    conf = tmp_path_factory.mktemp("toy_conf")
    for name, text in CONFIGS.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    entry = Method(
        f"{Toy.__module__}.{Toy.__qualname__}",
        label=LABEL,
        colour=COLOUR,
        order=max(m.order for m in METHOD_TABLE.values()) + 1,  # last in the report
        views=("crop_flip",),
        crop_scale=(0.5, 1.0),
        networks=("mean-colour head",),
        cost=COST,  # longer than any shipped method: the study starts it first
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHOD_TABLE, "toy", entry)
        yield f"hydra.searchpath=[file://{conf}]"


@pytest.fixture(scope="module")
def toy_runs(toy: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``advpt pretrain method=toy``, nominal and l2-adversarial, a few steps each."""
    root = tmp_path_factory.mktemp("toy_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for arm, attack in (("none", ["attack=none"]), ("l2", ["attack=l2", "eps=0.5"])):
            runs[arm] = root / "pretrain" / f"toy-{arm}"
            assert run_cli(["pretrain", "method=toy", *attack, *RUN, toy, f"hydra.run.dir={runs[arm]}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return runs


def test_every_list_of_methods_reads_the_table_when_used(toy: str) -> None:
    """Toy's entry was added after every module was imported: no list of methods is a copy made then."""
    from advpt import methods, names
    from advpt.method_table import REPORT_ORDER
    from advpt.report import aggregate, plots

    assert (
        tuple(names.METHODS)[-1] == "toy"
        and "toy" in names.METHODS
        and len(names.METHODS) == len(METHOD_TABLE)
    )
    assert REPORT_ORDER[-1] == aggregate.METHOD_ORDER[-1] == list(names.METHOD_LABEL)[-1] == "toy"
    assert names.METHOD_LABEL["toy"] == LABEL and plots.COLOURS["toy"] == COLOUR
    assert methods.METHODS["toy"] is Toy


def test_a_method_needs_its_table_entry_and_its_config(toy: str, monkeypatch, capsys) -> None:
    from advpt.config import compose

    assert run_cli(["pretrain", "method=toy", *RUN]) == 2  # no config: Hydra does not know it
    one_line(capsys.readouterr().err, "pretrain", "unknown method option 'toy'")
    for recipe in ("cpu", "paper"):  # its config and both recipes compose
        assert compose("pretrain", ["method=toy", f"recipe={recipe}", toy]).method.name == "toy"
    monkeypatch.delitem(METHOD_TABLE, "toy")  # a config without its table entry is refused
    assert run_cli(["pretrain", "method=toy", *RUN, toy]) == 2
    one_line(capsys.readouterr().err, "pretrain", "unknown method 'toy'", ", ".join(METHOD_TABLE))


def test_advpt_pretrain_trains_toy_nominally_and_adversarially(toy_runs: dict[str, Path]) -> None:
    import timm
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    for arm, run in toy_runs.items():
        spec = json.loads((run / "encoder.json").read_text())
        assert spec["method"] == "toy"
        vit = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
        vit.load_state_dict(load_file(run / "encoder.safetensors"))  # strict: the whole encoder
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert state["head.weight"].shape == (
            3,
            spec["kwargs"]["embed_dim"],
        )  # Toy's own head, trained beside the encoder
        cfg = OmegaConf.load(run / "config.yaml")
        assert cfg.method.name == "toy" and cfg.attack.name == arm
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        losses = [r for r in rows if r.get("train/loss")]
        assert len(losses) == 3
        if arm == "none":
            assert "train/loss_attacked" not in rows[0]
            continue
        assert cfg.eps == 0.5
        norms = [float(r["train/delta_norm"]) for r in rows if r.get("train/delta_norm")]
        assert norms and all(0 < n <= 0.5 + 1e-6 for n in norms)
        for row in losses:  # the attack, on Toy's own loss, raised it at every logged step
            assert float(row["train/loss_attacked"]) > float(row["train/loss_clean"]), row


def _study(toy: str):
    from advpt.config import compose

    cfg = compose(
        "study",
        [
            "experiment=smoke",
            "experiment.pretrain.methods=[mae,toy]",
            "experiment.finetune.layer_decays=[0.65]",
            "experiment.transfer.datasets=[]",
            "report=false",
        ],
    )
    with open_dict(cfg):  # the study's pre-training runs find toy's config as the command line did
        cfg.experiment.pretrain.overrides.append(toy)
    return cfg


def test_the_study_plans_toy_and_starts_its_adversarial_run_first(
    toy: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from advpt.config import validate
    from advpt.study import Runner, check, finetune_jobs, pretrain_jobs, run_study
    from advpt.study.runner import _expected_cost

    cfg = check(_study(toy))
    pre = pretrain_jobs(cfg, tmp_path)
    assert [j.name for j in pre] == ["mae-none-s0", "mae-l2-0.5-s0", "toy-none-s0", "toy-l2-0.5-s0"]
    for job in pre[2:]:  # toy's planned command lines pass every check of advpt pretrain
        assert job.overrides[0] == "method=toy" and job.labels["method"] == "toy"
        validate("pretrain", job.overrides, multirun=False, module="advpt.pretrain")
    tuned = {j.name: j for j in finetune_jobs(cfg, tmp_path, pre)}
    assert tuned["toy-l2-0.5-s0-builtin-adamw_lld-ld0.65"].needs is pre[3]
    assert tuned["toy-none-s0-builtin-adamw_lld-ld0.65"].labels["method"] == "toy"
    assert _expected_cost(pre[3]) == 2 * COST and _expected_cost(pre[1]) == 2.0  # its table cost

    started: list[str] = []

    def fake_run(self: Runner, job: Any) -> int:
        started.append(job.name)
        job.product.parent.mkdir(parents=True, exist_ok=True)
        job.product.touch()
        time.sleep(0.01)  # each product newer than the one it starts from
        return 0

    monkeypatch.setattr(Runner, "_run", fake_run)
    assert run_study(cfg, tmp_path) == 0
    # adversarial before nominal, and toy (cost 5) before MAE (cost 1) although the table lists it last
    assert started[:4] == ["toy-l2-0.5-s0", "mae-l2-0.5-s0", "mae-none-s0", "toy-none-s0"]
    assert "pretrain 4/4 done" in capsys.readouterr().out


def _tuned_and_scored(runs: Path, pretrained: Path, top1: float, decay: float) -> None:
    """A fine-tuning of the encoder of run ``pretrained`` and its evaluation, as advpt finetune and evaluate
    write them."""
    name = f"{pretrained.name}-ld{decay}"
    ft, ev = runs / "finetune" / name, runs / "evaluate" / name
    ft.mkdir(parents=True)
    ev.mkdir(parents=True)
    spec = {
        "pretrained": str(pretrained / "encoder.safetensors"),
        "layer_decay": decay,
        "optim": {"name": "adamw_lld"},
    }
    (ft / "model.json").write_text(json.dumps({**spec, "data": {"name": "builtin"}}))
    (ft / "config.yaml").write_text("seed: 0\n")
    sets = {"builtin": {"top1": top1, "images": 200}, "corruptions": {"top1": top1 - 0.2, "images": 200}}
    (ev / "results.json").write_text(
        json.dumps({"checkpoint": str(ft / "model.safetensors"), "suite": "auto", "sets": sets, "robust": {}})
    )


def test_the_report_draws_toy_by_its_label_and_colour(
    toy_runs: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    from matplotlib.colors import to_rgba

    from advpt.report import build_report, plots
    from advpt.report.aggregate import methods_in

    runs = tmp_path / "runs"
    sets = {"builtin": (0.8, 200), "corruptions": (0.6, 200)}
    make_chain(runs, "scratch", "scratch", "none", 0, sets, 1.0)
    for decay in (0.65, 0.85):
        make_chain(runs, "mae-l2", "mae", "l2", 0.5, sets, decay)
        for arm, top1 in (("none", 0.85), ("l2", 0.9)):  # toy's real pre-training runs, tuned and scored
            _tuned_and_scored(runs, toy_runs[arm], top1 - (decay - 0.65), decay)

    legends: dict[str, dict[str, tuple]] = {}
    save = plots._save

    def keep_legend(fig: Any, path: Path) -> Path:  # each figure's legend: label -> colour
        legends[path.name] = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                line = handle.lines[0] if hasattr(handle, "lines") else handle  # an errorbar's data line
                legends[path.name][label] = to_rgba(line.get_color())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_legend)
    out = tmp_path / "report"
    notes: list[str] = []
    written = {p.name for p in build_report([runs], out, note=notes.append)}
    assert not [n for n in notes if "skipped" in n]  # every evaluation traced to its pre-training run
    assert {"fig1_eps.png", "fig3_layer_decay.png", "summary.md"} <= written

    assert legends["fig1_eps.png"][LABEL] == to_rgba(COLOUR)  # its curve: its label, its colour
    assert legends["fig1_eps.png"]["MAE"] == to_rgba(METHOD_TABLE["mae"].colour)
    fig1 = list(csv.DictReader((out / "fig1_eps.csv").read_text().splitlines()))
    assert methods_in(r["method"] for r in fig1) == ["mae", "toy"]  # the table's order: toy last
    assert {(r["method"], r["attack"]) for r in fig1 if r["method"] == "toy"} == {
        ("toy", "none"),
        ("toy", "l2"),
    }
    summary = (out / "summary.md").read_text()
    assert f"{LABEL} nominal" in summary and f"{LABEL} l2 0.5" in summary

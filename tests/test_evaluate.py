"""``advpt evaluate``: robust accuracy against a closed form, the shifted and ImageNet-variant suites, the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose, finetuned_run, one_line, planted_margins, run_cli
from PIL import Image

from advpt.attacks import Attack
from advpt.data.corruptions import CORRUPTIONS
from advpt.data.variants import imagenet_synsets, subset_indices
from advpt.evaluate import evaluate, format_table, robust_accuracy, robust_specs

# ------------------------------------------------------------------------------ robust accuracy, closed form


@pytest.mark.parametrize("norm,unit", [("linf", 2 / 255), ("l2", 0.1)])
def test_robust_accuracy_of_a_linear_model_is_its_closed_form(norm: str, unit: float) -> None:
    model, x, y, expected = planted_margins(norm, unit)
    radii = [0.0, unit, 2 * unit]
    # Step size = radius: the linear case reaches the optimum of the ball in a few steps.
    attacks = [Attack(norm, eps, steps=20, step_size=eps, restarts=1) for eps in radii]
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    scores = robust_accuracy(model, batches, attacks)
    assert [(s.correct, s.images) for s in scores] == [(n, 42) for n in expected]


def test_robust_specs_parse_radii_and_default_step_size() -> None:
    cfg = compose().robust
    specs = robust_specs(cfg, size=16)
    assert [(s.norm, s.radius) for s in specs] == [
        ("linf", "1/255"),
        ("linf", "2/255"),
        ("linf", "4/255"),
        ("l2", "0.25"),
        ("l2", "0.5"),
        ("l2", "1.0"),
    ]
    first = specs[0].attack
    assert first.eps == pytest.approx(1 / 255) and first.steps == 10 and first.random_start
    assert first.alpha == pytest.approx(2.5 / 10 / 255)  # Madry et al.'s 2.5 * eps / steps


# ------------------------------------------------------------------------------------------- suite=auto
def test_shifted_suite_on_the_builtin_test_split(tmp_path: Path) -> None:
    from advpt.data.module import Transformed
    from advpt.data.sources import Digits
    from advpt.data.transforms import eval_transform
    from advpt.evaluate import capped, load_classifier, read_spec

    run = finetuned_run(tmp_path / "ft")
    results = evaluate(compose(f"checkpoint={run}", *FAST), tmp_path / "out", warn=pytest.fail)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["checkpoint"] == str((run / "model.safetensors").resolve())
    assert results["top1_unit"] == "fraction"

    sets = results["sets"]
    assert len(CORRUPTIONS) == 15
    assert list(sets) == ["builtin", "corruptions", *(f"corruptions/{c}" for c in CORRUPTIONS)]
    # Clean top-1 equals the model's accuracy on the same 4 capped test images, computed here directly.
    spec = read_spec(run / "model.safetensors")
    model = load_classifier(run / "model.safetensors", spec)
    images = capped(Transformed(Digits(train=False, size=16), eval_transform(16)), 4, 0)
    x = torch.stack([images[i][0] for i in range(4)])
    y = torch.tensor([images[i][1] for i in range(4)])
    assert sets["builtin"] == {"top1": (model(x).argmax(-1) == y).float().mean().item(), "images": 4}

    per_corruption = [sets[f"corruptions/{c}"] for c in CORRUPTIONS]
    for entry in per_corruption:
        assert entry["group"] == "corruptions" and entry["images"] == 4 * 5
        assert sorted(entry["severities"]) == ["1", "2", "3", "4", "5"]
        assert entry["top1"] == pytest.approx(sum(entry["severities"].values()) / 5)
        assert all(v in (0, 0.25, 0.5, 0.75, 1) for v in entry["severities"].values())
    mean = sets["corruptions"]
    assert mean["images"] == 300 and mean["subsets"] == 75
    assert mean["top1"] == pytest.approx(sum(e["top1"] for e in per_corruption) / 15)
    assert results["average"] == {
        "top1": pytest.approx((sets["builtin"]["top1"] + mean["top1"]) / 2),
        "sets": 2,
        "of": 2,
    }

    robust = results["robust"]
    assert results["robust_set"] == "builtin"
    assert {n: list(r) for n, r in robust.items()} == {
        "linf": ["1/255", "2/255", "4/255"],
        "l2": ["0.25", "0.5", "1.0"],
    }
    for by_radius in robust.values():
        for r in by_radius.values():
            assert r["images"] == 4 and r["steps"] == 1 and r["restarts"] == 1
            assert 0 <= r["accuracy"] <= 1

    table = format_table(results)
    for row in ("builtin", "corruptions", *CORRUPTIONS, "average (2 of 2 sets)", "1/255", "0.25"):
        assert row in table, row
    assert f"{100 * sets['builtin']['top1']:.2f}" in table


def test_robust_disabled_and_no_corruptions(tmp_path: Path) -> None:
    run = finetuned_run(tmp_path / "ft")
    cfg = compose(f"checkpoint={run}", *FAST, "corruptions=false", "robust.enabled=false")
    results = evaluate(cfg, tmp_path / "out", warn=pytest.fail)
    assert list(results["sets"]) == ["builtin"]
    assert results["average"]["sets"] == 1 and results["average"]["of"] == 2
    assert results["robust"] == {} and results["robust_set"] is None


# -------------------------------------------------------------------------------- suite=imagenet_variants
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 90)).save(path)


def _imagenet_root(root: Path, with_val: bool) -> int:
    """IN-A and IN-R folders (and optionally val/) of a few PNGs; returns the class a constant model predicts."""
    wnids = imagenet_synsets()
    a, r = subset_indices("a"), subset_indices("r")
    k = sorted(set(a) & set(r))[0]
    other_a = next(i for i in a if i != k)
    other_r = next(i for i in r if i != k)
    for i in range(3):
        _png(root / "imagenet-a" / wnids[k] / f"{i}.png", 40 * i)
    _png(root / "imagenet-a" / wnids[other_a] / "0.png", 200)  # IN-A: 3 of 4 are class k
    _png(root / "imagenet-r" / wnids[k] / "0.png", 10)
    _png(root / "imagenet-r" / wnids[other_r] / "0.png", 90)  # IN-R: 1 of 2
    if with_val:
        assert k not in range(500, 504)
        _png(root / "val" / wnids[k] / "a.png", 30)
        for i in range(4):
            _png(root / "val" / wnids[i + 500] / f"{i}.png", 60 * i)  # val: 1 of 5
        # IN-C: three of the 75 subsets, one image each: right, wrong, right.
        _png(root / "imagenet-c" / "gaussian_noise" / "1" / wnids[k] / "0.png", 20)
        _png(root / "imagenet-c" / "gaussian_noise" / "2" / wnids[500] / "0.png", 20)
        _png(root / "imagenet-c" / "fog" / "5" / wnids[k] / "0.png", 20)
    return k


def test_imagenet_variants_present_sets_skipped_ones_warned(tmp_path: Path) -> None:
    k = _imagenet_root(tmp_path / "imagenet", with_val=False)
    run = finetuned_run(tmp_path / "ft", num_classes=1000, constant=k)
    warned: list[str] = []
    cfg = compose(f"checkpoint={run}", "suite=imagenet_variants", f"root={tmp_path / 'imagenet'}", *FAST)
    results = evaluate(cfg, tmp_path / "out", warn=warned.append)

    assert results["sets"] == {
        "imagenet_a": {"top1": 0.75, "images": 4},
        "imagenet_r": {"top1": 0.5, "images": 2},
    }
    assert results["average"] == {"top1": pytest.approx(0.625), "sets": 2, "of": 8}
    for name in (
        "imagenet_val",
        "imagenet_real",
        "imagenet_v2",
        "imagenet_sketch",
        "conflict_stimuli",
        "imagenet_c",
    ):
        assert sum(m.startswith(f"{name}:") for m in warned) == 1, (name, warned)
    assert any(m.startswith("robust accuracy: skipped") for m in warned)
    assert results["warnings"] == warned and results["robust"] == {}
    assert "average (2 of 8 sets)" in format_table(results)


def test_imagenet_variants_robust_accuracy_on_val(tmp_path: Path) -> None:
    k = _imagenet_root(tmp_path / "imagenet", with_val=True)
    run = finetuned_run(tmp_path / "ft", num_classes=1000, constant=k)
    cfg = compose(
        f"checkpoint={run}",
        "suite=imagenet_variants",
        f"root={tmp_path / 'imagenet'}",
        *FAST,
        "max_images=null",
        "robust.max_images=null",
    )
    results = evaluate(cfg, tmp_path / "out", warn=lambda m: None)
    sets = results["sets"]
    assert list(sets) == [
        "imagenet_val",
        "imagenet_a",
        "imagenet_r",
        "imagenet_c",
        "imagenet_c/gaussian_noise",
        "imagenet_c/fog",
    ]
    assert sets["imagenet_val"] == {"top1": 0.2, "images": 5}
    # IN-C: the mean over the subsets present (group_mean), and per corruption the mean over its severities.
    assert sets["imagenet_c"] == {"top1": pytest.approx(2 / 3), "images": 3, "subsets": 3}
    assert sets["imagenet_c/gaussian_noise"]["severities"] == {"1": 1.0, "2": 0.0}
    assert sets["imagenet_c/gaussian_noise"]["top1"] == 0.5 and sets["imagenet_c/fog"]["top1"] == 1.0
    average = results["average"]
    assert (average["sets"], average["of"]) == (4, 8)
    assert average["top1"] == pytest.approx((0.2 + 0.75 + 0.5 + 2 / 3) / 4)
    # The output ignores the input, so no attack changes it: robust accuracy = clean accuracy on val.
    assert results["robust_set"] == "imagenet_val"
    assert all(
        r["accuracy"] == 0.2 and r["images"] == 5 for rs in results["robust"].values() for r in rs.values()
    )


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_evaluates_the_latest_finetuned_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    older = finetuned_run(tmp_path / "outputs" / "finetune" / "old")
    newest = finetuned_run(tmp_path / "outputs" / "finetune" / "sweep" / "new")
    stamp = (older / "model.safetensors").stat().st_mtime
    os.utime(older / "model.safetensors", (stamp - 100, stamp - 100))
    assert (
        run_cli(["evaluate", "max_images=2", "num_workers=0", "robust.max_images=2", "robust.steps=2"]) == 0
    )

    (results_path,) = tmp_path.glob("outputs/evaluate/*/results.json")
    results = json.loads(results_path.read_text())
    assert results["checkpoint"] == str(newest / "model.safetensors")
    assert len([n for n in results["sets"] if n.startswith("corruptions/")]) == 15
    out = capsys.readouterr().out
    assert "average (2 of 2 sets)" in out and "jpeg_compression" in out and "2/255" in out
    run = Path("outputs") / "evaluate" / results_path.parent.name
    assert out.strip().splitlines()[-3:] == [  # the table, then where it is and what to run next
        f"advpt evaluate: results in {run / 'results.json'}",
        f"  run:  {run}",
        f"  next: advpt visualize checkpoint={newest.relative_to(tmp_path)}",
    ]
    assert all(math.isfinite(r["accuracy"]) for rs in results["robust"].values() for r in rs.values())


@pytest.fixture
def pretrain_run(tmp_path: Path) -> Path:
    run = tmp_path / "pre"
    run.mkdir()
    (run / "encoder.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    "args,needle",
    [
        (["checkpoint=/no/such/run"], "checkpoint=/no/such/run does not exist"),
        ([], "run advpt finetune first or pass checkpoint=PATH"),
        (["checkpoint={pre}"], "is a pre-trained encoder without a classifier head"),
        (["checkpoint={pre}/encoder.safetensors"], "is a pre-trained encoder without a classifier head"),
        (["checkpoint={junk}"], "model.json is missing beside it"),
        (
            ["checkpoint={ft}", "suite=cifar_c"],
            "unknown suite 'cifar_c'; choose one of auto, imagenet_variants",
        ),
        (["checkpoint={ft}", "suite=imagenet_variants"], "suite=imagenet_variants needs root=PATH"),
        (
            ["checkpoint={ft}", "suite=imagenet_variants", "root={tmp}"],
            "needs a 1000-way ImageNet classifier",
        ),
        (["checkpoint={ft}", "suite=imagenet_variants", "root=/no/dir"], "root=/no/dir does not exist"),
        (["checkpoint={ft}", "robust.radii.l2=[0.5,-1]"], "radius -1 is out of range"),
        (["checkpoint={ft}", "robust.radii.linf=[8]"], "not an l_inf radius"),
        (["checkpoint={ft}", "robust.steps=0"], "robust.steps=0 is invalid"),
        (["checkpoint={ft}", "robust.norms=[l3]"], "unknown norm 'l3'"),
        (["checkpoint={ft}", "precision=fp8"], "precision=fp8 is not supported"),
        (["checkpoint={ft}", "max_images=0"], "max_images=0 is invalid"),
        (["checkpoint={ft}", "colour=1"], "unknown key 'colour'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    args, needle, tmp_path, monkeypatch, capsys, pretrain_run
) -> None:
    ft = finetuned_run(tmp_path / "ft")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(pre=pretrain_run, ft=ft, junk=junk, tmp=tmp_path) for a in args]
    assert run_cli(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "evaluate", needle)
    assert sorted(tmp_path.rglob("*")) == before

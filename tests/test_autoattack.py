"""``robust.attack=autoattack``: AutoAttack (the optional extra) against a closed form, in results.json, and absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import FAST, compose, finetuned_run, one_line, planted_margins, run_cli

from advpt.attacks import Attack
from advpt.errors import UserError
from advpt.evaluate import evaluate, format_table, robust_results
from advpt.evaluate.autoattack import autoattack_accuracy
from advpt.evaluate.robust import RobustSpec

STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]


@pytest.mark.parametrize("norm,unit", [("linf", 2 / 255), ("l2", 0.1)])
def test_autoattack_on_a_linear_model_is_the_closed_form(norm: str, unit: float) -> None:
    pytest.importorskip("pyautoattack")
    model, x, y, expected = planted_margins(norm, unit, side=8)  # Square's l2 search needs >= 5 px
    radii = {"0": 0.0, "2u": 2 * unit}  # each radius > 0 costs Square's 5000 queries
    specs = [RobustSpec(norm, r, Attack(norm, eps, steps=20, step_size=eps)) for r, eps in radii.items()]
    warned: list[str] = []
    table, record = robust_results(model, [(x, y)], specs, "autoattack", num_classes=2, warn=warned.append)
    assert table == {
        norm: {
            r: {"accuracy": n / 42, "images": 42, "eps": eps, "attack": "autoattack"}
            for (r, eps), n in zip(radii.items(), (expected[0], expected[2]), strict=True)
        }
    }
    assert all(m.startswith("autoattack: ") for m in warned)
    assert record["name"] == "autoattack" and record["version"] == "standard"
    assert record["implementation"].startswith("pyautoattack ")
    # under 4 classes the targeted DLR loss is undefined: APGD-T is left out; FAB-T gets classes - 1 targets
    assert record["attacks"] == ["apgd-ce", "fab-t", "square"] and record["target_classes"] == 1
    # PGD reaches the optimum of a linear model: the same numbers, recorded as PGD's
    pgd, record = robust_results(model, [(x, y)], specs, "pgd", num_classes=2)
    assert [e["accuracy"] for e in pgd[norm].values()] == [e["accuracy"] for e in table[norm].values()]
    assert record == {"name": "pgd", "implementation": "advpt.attacks", "steps": 20, "restarts": 1}
    assert pgd[norm]["2u"]["attack"] == "pgd" and pgd[norm]["2u"]["steps"] == 20


def test_evaluate_with_autoattack_writes_which_attack(tmp_path: Path) -> None:
    pytest.importorskip("pyautoattack")
    run = finetuned_run(tmp_path / "ft")  # 10 classes: the standard version, 9 target classes
    overrides = [*FAST, "max_images=24", "robust.max_images=24", "corruptions=false"]
    attack = ["robust.attack=autoattack", "robust.norms=[linf]", "robust.radii.linf=[0,8/255]"]
    results = evaluate(
        compose(f"checkpoint={run}", *overrides, *attack), tmp_path / "out", warn=lambda m: None
    )
    assert (
        json.loads((tmp_path / "out" / "results.json").read_text())["robust_attack"]
        == results["robust_attack"]
    )
    record = results["robust_attack"]
    assert record["name"] == "autoattack" and record["attacks"] == STANDARD and record["target_classes"] == 9
    clean = results["sets"]["builtin"]  # the same 24 images (one seed, one size) as the attacked ones
    zero, eight = results["robust"]["linf"]["0"], results["robust"]["linf"]["8/255"]
    assert clean["images"] == zero["images"] == eight["images"] == 24
    assert zero["accuracy"] == clean["top1"] > 0  # radius 0: the clean prediction
    assert eight["accuracy"] <= clean["top1"] and eight["attack"] == "autoattack"
    assert "(AutoAttack standard: APGD-CE, APGD-T, FAB-T, SQUARE)" in format_table(results)


def test_pgd_stays_the_default_and_says_so(tmp_path: Path) -> None:
    run = finetuned_run(tmp_path / "ft")
    overrides = [*FAST, "corruptions=false", "robust.norms=[l2]", "robust.radii.l2=[0.5]"]
    results = evaluate(compose(f"checkpoint={run}", *overrides), tmp_path / "out", warn=pytest.fail)
    assert results["robust_attack"] == {
        "name": "pgd",
        "implementation": "advpt.attacks",
        "steps": 1,
        "restarts": 1,
    }
    assert results["robust"]["l2"]["0.5"]["attack"] == "pgd"
    assert "(PGD-1, 1 restart)" in format_table(results)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["robust.attack=autoattack"],
            "robust.attack=autoattack needs AutoAttack, an optional extra: pip install 'advpt[autoattack]'",
        ),
        (["robust.attack=cw"], "robust.attack=cw is unknown; choose one of pgd, autoattack"),
    ],
)
def test_missing_extra_or_unknown_attack_is_one_line(
    args: list[str], needle: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = finetuned_run(tmp_path / "ft")
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if the extra were not installed
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert run_cli(["evaluate", f"checkpoint={run}", *args]) == 2
    err = capsys.readouterr().err
    one_line(err, "evaluate", needle)
    assert sorted(tmp_path.rglob("*")) == before


def test_missing_extra_at_attack_time(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    model, x, y, _ = planted_margins("linf", 2 / 255)
    with pytest.raises(UserError, match=r"pip install 'advpt\[autoattack\]'"):
        autoattack_accuracy(model, [(x, y)], [Attack("linf", 2 / 255)], num_classes=2)

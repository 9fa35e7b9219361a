"""The downstream chain on the built-in data: pretrain -> finetune -> evaluate -> visualize, each on its default input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

QUIET = ["trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_pretrain_finetune_evaluate_visualize(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        run_cli(
            [
                "pretrain",
                "method=mae",
                "attack=l2",
                "eps=0.5",
                "model=vit_micro",
                "trainer.max_steps=2",
                *QUIET,
            ]
        )
        == 0
    )
    # finetune / evaluate / visualize find the newest run of the previous step by themselves.
    assert run_cli(["finetune", "trainer.max_steps=2", *QUIET]) == 0
    assert run_cli(["evaluate", "subset_max_images=4", "robust.max_images=8", "robust.steps=2"]) == 0
    table = capsys.readouterr().out
    assert run_cli(["visualize"]) == 0

    (results,) = tmp_path.glob("outputs/evaluate/*/results.json")
    r = json.loads(results.read_text())
    assert r["sets"]["builtin"]["images"] == 360 and 0 <= r["sets"]["builtin"]["top1"] <= 1
    assert r["average"]["sets"] == 2 and set(r["robust"]) == {"linf", "l2"}
    assert "builtin" in table and "gaussian_noise" in table and "robust accuracy" in table
    (png,) = tmp_path.glob("outputs/visualize/*/filters.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (model_json,) = tmp_path.glob("outputs/finetune/*/*/model.json")
    assert "outputs/pretrain/mae-l2" in json.loads(model_json.read_text())["pretrained"]

"""The table of methods is the one list of them: every name in it has its config, class, label, colour,
place in the report and views, and every other list of methods is read from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advpt import names
from advpt.method_table import METHOD_TABLE, REPORT_ORDER, SCRATCH, method_class

CONF = Path(__file__).resolve().parent.parent / "conf"


def test_the_table_and_the_names_import_nothing_heavy() -> None:
    """The command line checks ``method=`` against the table before torch loads, as it does commands."""
    script = (
        "import sys\n"
        "import advpt.commands, advpt.method_table, advpt.names\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'timm', 'omegaconf', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, sorted(m for m in sys.modules if m.startswith('advpt')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
    assert "'advpt.commands', 'advpt.method_table', 'advpt.names']" in done.stdout


def test_every_list_of_methods_is_the_table() -> None:
    from advpt.methods import METHODS
    from advpt.report.aggregate import METHOD_ORDER
    from advpt.report.plots import COLOURS

    assert names.METHODS == tuple(METHOD_TABLE) == tuple(METHODS)
    assert tuple(names.METHOD_LABEL) == METHOD_ORDER == REPORT_ORDER
    assert set(COLOURS) == set(METHOD_TABLE)
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == sorted(METHOD_TABLE)
    assert SCRATCH not in METHOD_TABLE


@pytest.mark.parametrize("name", list(METHOD_TABLE))
def test_each_method_has_its_config_class_label_colour_and_views(name: str) -> None:
    from matplotlib.colors import is_color_like

    from advpt.data.transforms import VIEWS, pretrain_views
    from advpt.methods import METHODS, PretrainMethod

    method = METHOD_TABLE[name]
    cfg = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
    assert cfg["name"] == name and cfg["views"]["kind"] == name
    cls = method_class(name)
    assert issubclass(cls, PretrainMethod) and METHODS[name] is cls
    assert method.label and [m.label for m in METHOD_TABLE.values()].count(method.label) == 1
    assert is_color_like(method.colour)
    assert REPORT_ORDER[method.order] == name  # places 0..n-1, each once
    assert method.views and all(view in VIEWS for view in method.views)
    assert len(pretrain_views(cfg["views"], 16).transforms) == len(method.views)
    assert 0 < method.crop_scale[0] < method.crop_scale[1] <= 1 and method.cost > 0 and method.networks


def test_a_views_kind_the_table_lacks_is_refused() -> None:
    from advpt.data.transforms import pretrain_views

    with pytest.raises(ValueError, match="unknown augmentation 'foo'"):
        pretrain_views("foo", 16)


def test_the_study_starts_the_costliest_adversarial_pre_training_first() -> None:
    from advpt.study.plan import Job
    from advpt.study.runner import _expected_cost

    def cost(command: str, stage: str, **labels: object) -> float:
        return _expected_cost(Job(stage, command, "x", Path("x"), [], labels=dict(labels)))

    assert cost("pretrain", "pretrain", method="byol", attack="l2") == 3.0  # BYOL: two networks
    assert cost("pretrain", "pretrain", method="mae", attack="linf") == 2.0
    assert cost("pretrain", "pretrain", method="byol", attack="none") == 0.0
    assert cost("finetune", "finetune", method=SCRATCH, attack="none") == 1.0
    assert cost("finetune", "finetune", method="mae", attack="l2") == 0.0

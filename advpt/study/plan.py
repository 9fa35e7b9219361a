"""The plan of a study: every run of an experiment's grid as a :class:`Job` with a fixed folder, named by
what it computes, and the job it starts from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from advpt.errors import UserError
from advpt.method_table import SCRATCH
from advpt.names import ATTACKS, METHODS
from advpt.report.collect import radius_value
from advpt.runs import PRODUCTS, is_finished


@dataclass
class Job:
    """One ``advpt`` run of the study: its command, folder and overrides, and the job it needs first."""

    stage: str
    command: str
    name: str
    directory: Path
    overrides: list[str]
    needs: Job | None = None
    resumable: bool = True
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def product(self) -> Path:
        return self.directory / PRODUCTS[self.command]

    @property
    def finished(self) -> bool:
        """Its product is there, and newer than the product of the job it started from (a model that
        was trained again is evaluated again)."""
        if not is_finished(self.directory, self.command):
            return False
        if self.needs is None or not self.needs.finished:
            return self.needs is None
        return self.product.stat().st_mtime >= self.needs.product.stat().st_mtime

    def argv(self) -> list[str]:
        extra = ["resume=auto"] if self.resumable else []
        return [self.command, *self.overrides, *extra, f"hydra.run.dir={self.directory}"]


def radius_name(eps: Any) -> str:
    """A radius as part of a folder name: ``4/255`` -> ``4_255``, ``0.5`` -> ``0.5``."""
    return str(eps).replace("/", "_").replace(" ", "")


def _strings(values: Any) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, Sequence | ListConfig) or isinstance(values, str):
        raise UserError(f"expected a list of overrides, got {values!r}")
    return [str(v) for v in values]


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, ListConfig | list | tuple):
        return list(value)
    return [value]


# -- the plan ------------------------------------------------------------------------------------
def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """The experiment names known methods, attacks, radii and at least one pre-training arm."""
    from advpt.config import parse_number, positive_int

    exp = cfg.experiment
    seeds = cfg.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"seeds={seeds} is invalid: expected a whole number >= 1 (runs per arm)")
    positive_int(cfg.get("workers", 1), "workers", "the number of runs at a time must be")
    for method, attack, eps in arms(cfg):
        if method not in METHODS:
            raise UserError(
                f"experiment {exp.name}: unknown method {method!r}; choose from {', '.join(METHODS)}"
            )
        if attack not in ATTACKS:
            raise UserError(
                f"experiment {exp.name}: unknown attack {attack!r}; choose from {', '.join(ATTACKS)}"
            )
        if parse_number(eps, f"experiment {exp.name}: radius") < 0:
            raise UserError(f"experiment {exp.name}: radius {eps} of {method} {attack} is negative")
    if not arms(cfg):
        raise UserError(
            f"experiment {exp.name} has no pre-training arm (pretrain.methods x attacks, or arms)"
        )
    if not _list(exp.finetune.layer_decays):
        raise UserError("experiment.finetune.layer_decays is empty: give at least one layer decay")
    for key in ("data_root", "variants_root", "transfer_root"):
        needed = exp.get(f"needs_{key}", False)
        if needed and not cfg.get(key):
            raise UserError(f"experiment={exp.name} runs on external data: pass {key}=PATH")
        if cfg.get(key) and not Path(str(cfg[key])).expanduser().is_dir():
            raise UserError(f"{key}={cfg[key]} does not exist or is not a folder")
    return cfg


def arms(cfg: DictConfig) -> list[tuple[str, str, Any]]:
    """(method, attack, eps) of every pre-training arm: the grid methods x attacks x radii, then the
    experiment's explicit ``pretrain.arms`` (grids that are not a product, as Fig. 3 and Table 1)."""
    exp = cfg.experiment
    found: list[tuple[str, str, Any]] = []
    for method in _list(exp.pretrain.methods):
        for attack, radii in (exp.pretrain.attacks or {}).items():
            for eps in _list(radii) if attack != "none" else [0]:
                found.append((method, attack, eps))
    for arm in _list(exp.pretrain.get("arms")):
        found.append((arm["method"], arm["attack"], arm.get("eps", 0) if arm["attack"] != "none" else 0))
    return list(dict.fromkeys(found))


def image_side(cfg: DictConfig) -> int:
    """The image side the study's models see: its ``model`` config's ``img_size`` (recipe=cpu's model when
    the experiment names none)."""
    from advpt.config import CONF_DIR

    name = str(cfg.experiment.get("model") or "cpu")
    for _ in range(4):  # a model config may be an alias of another (``defaults: [name]``)
        found = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        if "img_size" in found:
            return int(found.img_size)
        name = str(_list(found.get("defaults"))[0])
    raise UserError(f"model={name}: no img_size")


def radius_used(cfg: DictConfig, attack: str, eps: Any) -> Any:
    """The radius a run is given: the experiment's as written, or, with ``pretrain.radii_units: paper``,
    its paper radius (224 px) at the study's image side (l2 x side / 224; l_inf unchanged)."""
    units = str(cfg.experiment.pretrain.get("radii_units") or "used")
    if units not in ("used", "paper"):
        raise UserError(f"experiment.pretrain.radii_units={units} is invalid: choose used or paper")
    if units == "used" or attack != "l2":
        return eps
    from advpt.radii import from_paper

    return repr(from_paper(attack, radius_value(eps), image_side(cfg)))


def pretrain_jobs(cfg: DictConfig, root: Path) -> list[Job]:
    exp = cfg.experiment
    common = [*([f"model={exp.model}"] if exp.get("model") else []), *_strings(exp.pretrain.overrides)]
    if exp.get("needs_data_root") and cfg.get("data_root"):
        common.append(f"data.root={cfg.data_root}")
    jobs = []
    for seed in range(int(cfg.seeds)):
        for method, attack, eps in arms(cfg):
            # named by the experiment's radius (the paper's, where it gives those)
            arm = f"{method}-none" if attack == "none" else f"{method}-{attack}-{radius_name(eps)}"
            name = f"{arm}-s{seed}"
            used = radius_used(cfg, attack, eps)
            radius = [] if attack == "none" else [f"eps={used}"]
            jobs.append(
                Job(
                    "pretrain",
                    "pretrain",
                    name,
                    root / "pretrain" / name,
                    [f"method={method}", f"attack={attack}", *radius, f"seed={seed}", *common],
                    labels={"method": method, "attack": attack, "eps": used, "seed": seed},
                )
            )
    return jobs


def knn_jobs(cfg: DictConfig, root: Path, pretrained: list[Job]) -> list[Job]:
    """kNN evaluation (clean and robust) of every pre-trained encoder: ``experiment.knn``'s overrides."""
    knn = cfg.experiment.get("knn")
    if not knn or not knn.get("enabled", True):
        return []
    overrides = _strings(knn.get("overrides"))
    return [
        Job(
            "knn",
            "evaluate",
            source.name,
            root / "knn" / source.name,
            [f"checkpoint={source.directory}", *overrides],
            needs=source,
            resumable=False,
            labels=dict(source.labels),
        )
        for source in pretrained
    ]


def probe_jobs(cfg: DictConfig, root: Path, pretrained: list[Job]) -> list[Job]:
    """A linear probe (frozen encoder) of every pre-trained encoder: ``experiment.probe``'s optimiser and
    overrides, on the fine-tuning data with its ``data_overrides`` (the same labelled subset)."""
    probe = cfg.experiment.get("probe")
    if not probe or not probe.get("enabled", True):
        return []
    exp = cfg.experiment
    data, optim = exp.finetune.data, str(probe.get("optim", "linear_probe"))
    extra = _strings(probe.get("overrides"))
    jobs = []
    for source in pretrained:
        job = finetune_job(cfg, root, source, source.labels["seed"], data, optim, 1.0, stage="probe")
        job.overrides += extra
        jobs.append(job)
    return jobs


def finetune_job(
    cfg: DictConfig,
    root: Path,
    source: Job | None,
    seed: int,
    data: str,
    optim: str,
    layer_decay: Any,
    stage: str = "finetune",
) -> Job:
    """Fine-tuning of ``source`` (``None``: from scratch) on ``data`` with ``optim`` at ``layer_decay``."""
    exp = cfg.experiment
    base = source.name if source is not None else f"{SCRATCH}-s{seed}"
    name = f"{base}-{data}-{optim}-ld{layer_decay}"
    if source is None:
        origin = ["pretrained=none", *([f"model={exp.model}"] if exp.get("model") else [])]
    else:
        origin = [f"pretrained={source.directory}"]
    extra = _strings(exp.finetune.overrides) if data == exp.finetune.data else []
    transfer = exp.get("transfer") or {}
    if stage == "transfer":
        extra = _strings(transfer.get("overrides"))
    if stage == "probe":  # the fine-tuning data's settings (labels), not its length or optimiser's
        extra = _strings((exp.get("probe") or {}).get("data_overrides"))
    if source is None:  # the scratch model's own settings come last: they win
        extra += _strings(exp.scratch.get("overrides"))
    data_args = [f"data={data}"]
    if cfg.get("data_root") and data == exp.finetune.data and exp.get("needs_data_root", False):
        data_args.append(f"data.root={cfg.data_root}")
    elif cfg.get("transfer_root") and data != exp.finetune.data:
        data_args.append(f"data.root={cfg.transfer_root}")
    labels = dict(source.labels) if source is not None else {"method": SCRATCH, "attack": "none", "eps": 0}
    labels.update(seed=seed, data=data, optim=optim, layer_decay=layer_decay)
    return Job(
        stage,
        "finetune",
        name,
        root / "finetune" / name,
        [*origin, *data_args, f"optim={optim}", f"layer_decay={layer_decay}", f"seed={seed}", *extra],
        needs=source,
        labels=labels,
    )


def finetune_jobs(cfg: DictConfig, root: Path, pretrained: list[Job]) -> list[Job]:
    exp = cfg.experiment
    data, optim = exp.finetune.data, exp.finetune.optim
    jobs = [
        finetune_job(cfg, root, source, source.labels["seed"], data, optim, decay)
        for source in pretrained
        for decay in _list(exp.finetune.layer_decays)
    ]
    if exp.scratch.get("enabled", True):
        decay = exp.scratch.get("layer_decay", 1.0)
        jobs += [finetune_job(cfg, root, None, seed, data, optim, decay) for seed in range(int(cfg.seeds))]
    return jobs


def evaluate_job(cfg: DictConfig, root: Path, finetuned: Job, overrides: list[str], suffix: str = "") -> Job:
    stage = {"transfer": "transfer-evaluate", "probe": "probe-evaluate"}.get(finetuned.stage, "evaluate")
    name = finetuned.name + suffix
    extra = []
    if cfg.get("variants_root") and "suite=imagenet_variants" in overrides:
        extra.append(f"root={cfg.variants_root}")
    # The data root the user typed for the study, typed again for evaluation: read back from the
    # run's model.json, a location that runs a program (pipe:) would be refused (advpt.trust).
    extra += [f"data_root={o.partition('=')[2]}" for o in finetuned.overrides if o.startswith("data.root=")]
    return Job(
        stage,
        "evaluate",
        name,
        root / "evaluate" / name,
        [f"checkpoint={finetuned.directory}", *overrides, *extra],
        needs=finetuned,
        resumable=False,
        labels=dict(finetuned.labels),
    )


def transfer_jobs(
    cfg: DictConfig, root: Path, pretrained: list[Job], best: Mapping[tuple[str, str], Any]
) -> list[Job]:
    """Table 1: the best radius of each method x attack (``best``: (method, attack) -> eps), transferred
    to every dataset with every optimiser. A run that fine-tuning already made is the same folder."""
    transfer = cfg.experiment.get("transfer") or {}
    if not transfer or not _list(transfer.get("datasets")):
        return []
    jobs = []
    for source in pretrained:
        key = (source.labels["method"], source.labels["attack"])
        if key not in best or abs(radius_value(best[key]) - radius_value(source.labels["eps"])) > 1e-9:
            continue
        for data in _list(transfer.datasets):
            for optim in _list(transfer.optims):
                decay = transfer.get("layer_decay", 1.0) if optim == "adamw_lld" else 1.0
                job = finetune_job(cfg, root, source, source.labels["seed"], data, optim, decay, "transfer")
                jobs.append(job)
    return jobs


# -- running -------------------------------------------------------------------------------------

"""The ``evaluate`` command: clean, shifted and robust top-1 of a fine-tuned classifier (paper §4, Fig. 5),
or the kNN top-1 of an encoder without a classifier head.

Two suites. ``auto`` evaluates on what the model was fine-tuned on (``model.json``'s data config): that
dataset's test split, and the same images under the 15 common corruptions x 5 severities generated on the
fly. ``imagenet_variants`` reads every ImageNet variant present under ``root`` (``advpt.data.variants``).

Scores are grouped: a corruption subset ``<group>/<corruption>/<severity>`` counts towards its group
(``corruptions`` or ``imagenet_c``), reported per corruption (mean over severities) and as one number.
The average is over the headline sets present, saying how many of the suite's sets it covers.

Robust accuracy: PGD (``advpt.attacks``) on the cross-entropy at each radius, or standard AutoAttack
(``robust.attack=autoattack``, the optional extra ``advpt[autoattack]``); an example counts as robust
when the model classifies the attacked input correctly (clean mistakes are attacked too and count as
failures), so robust accuracy is over all attacked images.

``results.json`` (top-1 and accuracies as fractions in [0, 1], ``"top1_unit": "fraction"``)::

    {"checkpoint": path, "suite": ..., "model": {...},
     "sets": {name: {"top1", "images"},                          # a headline set
              group: {"top1", "images", "subsets"},              # corruptions / imagenet_c: mean of subsets
              group/corruption: {"top1", "images", "group", "severities": {"1": top1, ...}}},
     "average": {"top1", "sets": headline sets present, "of": headline sets of the suite},
     "robust_set": name, "robust": {norm: {radius as written: {"accuracy", "images", "eps", "attack",
     PGD's "steps", "restarts", "step_size"}}},
     "robust_attack": {"name": "pgd" | "autoattack", "implementation", PGD's "steps", "restarts" |
                       AutoAttack's "version", "attacks", "target_classes"},
     "warnings": [...], "config": {...}}

An encoder (a pre-training run, ``timm:NAME``, an MAE release ``.pth`` with ``model=``) is scored by the
pre-training monitor's weighted kNN of its pooled features, clean and with each query pushed by PGD away
from its clean feature (``advpt.evaluate.knn``); a classifier's backbone too with ``knn.enabled=true``.
Its ``results.json``: ``{"checkpoint", "suite": "knn", "top1_unit", "model", "data", "knn", "warnings",
"config"}``, where ``"knn": {"top1", "robust_top1" (null: knn.robust=false), "k", "temperature", "bank",
"queries", "norm", "eps", "steps"}`` (a classifier's results.json gains the same ``knn`` when asked).

Beside it, ``outcomes.npz`` (:mod:`advpt.outcomes`, written first): per set, corruption subset and radius,
which images the model got right, with the images' indices in their split, so that two models scored on
the same images can be compared image by image (``advpt report``'s paired differences).

``checkpoint``: find and load the classifier; ``encoder``: an encoder's weights, model and data, the
``knn`` settings; ``knn``: the kNN measurement (shared with the monitor); ``suites``: which sets;
``scoring``: clean top-1; ``robust``: robust accuracy under PGD, ``autoattack``: under AutoAttack;
``table``: grouping, the average, the text table, ``results.json``; ``command``: check, evaluate, run.
"""

from advpt.evaluate.checkpoint import image_size, load_classifier, read_spec, resolve_checkpoint
from advpt.evaluate.command import check, evaluate, evaluate_encoder, run
from advpt.evaluate.encoder import EncoderSource, is_encoder, knn_results, knn_settings, resolve_encoder
from advpt.evaluate.knn import KnnProbe, KnnScores, knn_top1, knn_votes
from advpt.evaluate.robust import (
    ATTACKS,
    RobustSpec,
    robust_accuracy,
    robust_outcomes,
    robust_results,
    robust_specs,
)
from advpt.evaluate.scoring import PRECISIONS, Numbered, Score, clean_outcomes, clean_score
from advpt.evaluate.suites import (
    CORRUPTIONS_GROUP,
    IMAGENET_SETS,
    SUITES,
    Warn,
    auto_sets,
    capped,
    data_config,
    imagenet_sets,
)
from advpt.evaluate.table import format_table, summarise
from advpt.files import write_json

__all__ = [
    "ATTACKS",
    "CORRUPTIONS_GROUP",
    "IMAGENET_SETS",
    "PRECISIONS",
    "EncoderSource",
    "KnnProbe",
    "KnnScores",
    "Numbered",
    "SUITES",
    "RobustSpec",
    "Score",
    "Warn",
    "auto_sets",
    "capped",
    "check",
    "clean_outcomes",
    "clean_score",
    "data_config",
    "evaluate",
    "evaluate_encoder",
    "format_table",
    "image_size",
    "imagenet_sets",
    "is_encoder",
    "knn_results",
    "knn_settings",
    "knn_top1",
    "knn_votes",
    "load_classifier",
    "read_spec",
    "resolve_checkpoint",
    "resolve_encoder",
    "robust_accuracy",
    "robust_outcomes",
    "robust_results",
    "robust_specs",
    "run",
    "summarise",
    "write_json",
]

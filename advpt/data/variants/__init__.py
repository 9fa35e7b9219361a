"""ImageNet evaluation variants read from their published folder layouts.

``build_imagenet_variants(root, transform)`` looks for ImageNet val, ReaL, IN-V2, IN-A, IN-R, IN-Sketch, the
cue-conflict stimuli and the 75 IN-C subsets under one ``root`` and returns an ``EvalSet`` per set found;
a missing set is skipped with one ``warn(...)`` line naming the path(s) looked for. Scoring is
``EvalSet.correct(logits [B,1000], target) -> bool [B]``, accuracy ``correct.sum() / valid.sum()``.

Files: ``evalset`` (the ``EvalSet`` record, ``group_mean``), ``correct`` (which predictions count as correct in each set),
``labels`` (ImageNet-1k wnids, the 200-class subsets, the 16 coarse categories), ``images`` (the datasets),
``folders`` (each set's folder names and the folder scans), ``build`` (``build_imagenet_variants``).
"""

from advpt.data.variants.build import build_imagenet_variants
from advpt.data.variants.correct import (
    coarse16_probs,
    conflict_correct,
    real_correct,
    real_valid,
    subset_correct,
    top1_correct,
)
from advpt.data.variants.evalset import EvalSet, group_mean
from advpt.data.variants.folders import (
    FOLDERS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_SEVERITIES,
    IMG_EXTENSIONS,
    REAL_JSON,
)
from advpt.data.variants.images import LabeledImages, MultiLabelImages
from advpt.data.variants.labels import (
    NUM_CLASSES,
    conflict_categories,
    imagenet_synsets,
    subset_indices,
    wnid_to_index,
)

__all__ = [
    "FOLDERS",
    "IMAGENET_C_CORRUPTIONS",
    "IMAGENET_C_SEVERITIES",
    "IMG_EXTENSIONS",
    "NUM_CLASSES",
    "REAL_JSON",
    "EvalSet",
    "LabeledImages",
    "MultiLabelImages",
    "build_imagenet_variants",
    "coarse16_probs",
    "conflict_categories",
    "conflict_correct",
    "group_mean",
    "imagenet_synsets",
    "real_correct",
    "real_valid",
    "subset_correct",
    "subset_indices",
    "top1_correct",
    "wnid_to_index",
]

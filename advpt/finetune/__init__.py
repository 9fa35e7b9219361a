"""The ``finetune`` command (being split into a package; see ``pretrained``)."""

from advpt.finetune.pretrained import *  # noqa: F403
from advpt.finetune.pretrained import check, run  # noqa: F401

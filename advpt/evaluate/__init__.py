"""The ``evaluate`` command (being split into a package; see ``command``)."""

from advpt.evaluate.command import *  # noqa: F403
from advpt.evaluate.command import check, run  # noqa: F401

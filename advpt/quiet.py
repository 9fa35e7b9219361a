"""Messages that say nothing to a user of advpt, silenced once per process (the command line and
every worker process a run starts call :func:`silence_noise`). Real warnings still show."""

from __future__ import annotations

import logging
import warnings

# Warnings raised inside the libraries advpt drives, about the libraries, not about the run.
NOISY_WARNINGS = (
    # Lightning's pytree helper on newer torch (a library deprecation, nothing a user can change).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Short runs: the final step is always written to metrics.csv (advpt.training.callbacks.FinalStepMetrics).
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # metrics.csv sits beside the run's other outputs.
    r"Experiment logs directory .* exists and is not empty",
    # The weight EMA copy (supervised / RotNet recipes) is kept in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # data=shards: each loader process yields its own share of the epoch's batches (advpt.data.shards).
    r"Your `IterableDataset` has `__len__` defined",
    # Resuming mid-epoch: advpt's loaders carry their position in last.ckpt (advpt.data.module), so a
    # resumed run equals the uninterrupted one; Lightning cannot tell and warns.
    r"You're resuming from a checkpoint that ended before the epoch ended",
)
# Log lines Lightning prints at INFO: adverts and an internal default of its checkpoint writer.
NOISY_LOG_LINES = ("💡 Tip:", "`weights_only` was not set")
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOG_LINES)


_FILTER = _DropNoise()


def silence_noise() -> None:
    """Install the filters (idempotent; imports nothing heavy)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

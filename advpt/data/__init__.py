"""Datasets, per-method views and the datamodule."""

from advpt.data.module import PretrainData
from advpt.data.sources import build_source, check_source

__all__ = ["PretrainData", "build_source", "check_source"]

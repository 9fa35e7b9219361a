"""Datasets, per-method views, the datamodule, evaluation sets and corruptions (import the submodules)."""

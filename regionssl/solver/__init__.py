"""Optimizers for self-supervised pretraining."""
from .lars import LARS, build_lars_param_groups

__all__ = ["LARS", "build_lars_param_groups"]

"""The roster of pretraining recipes, read from the configs: tests, benchmarks and tools iterate over it.

A recipe is ``configs/<name>.yaml`` (``Base-*`` files excluded) whose ``MODEL.META_ARCHITECTURE`` is a
registered regionssl pretraining model; it comes with its quick schedule
``configs/quick_schedules/<name>_instant_test.yaml`` (a few CPU iterations, for tests) and, once it
joins the learning report (``tools/learning_report.py``), ``<name>_probe_demo.yaml`` (its miniature
learning recipe). What a method declares about itself
(its learning signals, iteration-valued keys, batch coupling) is read from its model class or
instance, never listed here.
"""
import functools
import glob
import os

from .scripts import REPO

__all__ = ["CONFIGS", "QUICK", "recipes", "learning_recipes", "recipe_config", "instant_test", "probe_demo",
           "meta_architecture"]

CONFIGS = os.path.join(REPO, "configs")
QUICK = os.path.join(CONFIGS, "quick_schedules")


def recipe_config(name):
    """``configs/<name>.yaml``."""
    return os.path.join(CONFIGS, name + ".yaml")


def instant_test(name):
    """``configs/quick_schedules/<name>_instant_test.yaml``."""
    return os.path.join(QUICK, name + "_instant_test.yaml")


def probe_demo(name):
    """``configs/quick_schedules/<name>_probe_demo.yaml``."""
    return os.path.join(QUICK, name + "_probe_demo.yaml")


@functools.lru_cache(maxsize=None)
def meta_architecture(name):
    """``MODEL.META_ARCHITECTURE`` of recipe ``name``."""
    from regionssl.engine import get_regionssl_cfg

    return get_regionssl_cfg(recipe_config(name)).MODEL.META_ARCHITECTURE


@functools.lru_cache(maxsize=None)
def _recipes():
    from regionssl.engine import get_regionssl_cfg, is_pretraining

    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
    return tuple(n for n in names if not n.startswith("Base-") and is_pretraining(get_regionssl_cfg(recipe_config(n))))


def recipes():
    """Names of the pretraining recipes, sorted (``byol``, ``cvsa``, ``insloc_c4``, ..., ``swav_region``)."""
    return list(_recipes())


def learning_recipes():
    """The recipes with a miniature learning recipe (``<name>_probe_demo.yaml``)."""
    return [name for name in recipes() if os.path.isfile(probe_demo(name))]

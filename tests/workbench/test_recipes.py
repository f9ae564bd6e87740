"""The roster of recipes (regionssl_workbench.recipes) that tests, benchmarks and tools iterate over:
complete, consistent with the registry, and the only place methods are listed."""
import io
import os
import tokenize

from detectron2.modeling import META_ARCH_REGISTRY

import regionssl  # noqa: F401  (registers the models)
from regionssl.engine import get_regionssl_cfg
from regionssl.modeling.meta_arch import RegionSSLBase
from regionssl_workbench.recipes import instant_test, learning_recipes, meta_architecture, probe_demo, recipes

from conftest import ROOT


def _registered_methods():
    return {name for name, cls in META_ARCH_REGISTRY if isinstance(cls, type) and issubclass(cls, RegionSSLBase)}


def test_roster_reads_the_configs():
    """The pretraining recipes of configs/ (not the Base-* files, not the detector configs), sorted."""
    names = recipes()
    assert names == sorted(names) and len(names) == len(set(names))
    assert "mocov2" in names and not any(n.startswith("Base-") for n in names)
    for name in names:
        assert os.path.isfile(os.path.join(ROOT, "configs", name + ".yaml"))
        assert get_regionssl_cfg(os.path.join(ROOT, "configs", name + ".yaml")).MODEL.META_ARCHITECTURE in _registered_methods()


def test_every_recipe_has_its_quick_schedules_of_the_same_method():
    for name in recipes():
        assert os.path.isfile(instant_test(name)), instant_test(name)
        for path in (instant_test(name), probe_demo(name)) if name in learning_recipes() else (instant_test(name),):
            assert get_regionssl_cfg(path).MODEL.META_ARCHITECTURE == meta_architecture(name), path
    assert learning_recipes() == recipes()  # today every recipe is in the learning report


def test_every_registered_method_has_a_recipe():
    assert {meta_architecture(n) for n in recipes()} == _registered_methods()


def test_the_engine_names_no_method():
    """No code identifier of regionssl/engine names a method or its config node (comments and
    docstrings may): what a method needs from the engine, it declares on its model class."""
    methods = {n.upper() for n in _registered_methods()}  # class names, and their config nodes (SWAV, CVSA, ...)
    engine = os.path.join(ROOT, "regionssl", "engine")
    found = []
    for name in sorted(os.listdir(engine)):
        if name.endswith(".py"):
            with open(os.path.join(engine, name)) as f:
                for tok in tokenize.generate_tokens(io.StringIO(f.read()).readline):
                    if tok.type == tokenize.NAME and tok.string.upper() in methods:
                        found.append(f"{name}:{tok.start[0]} {tok.string}")
    assert found == []

"""Helpers shared by the test files, and the test data they need.

* ``ROOT``, ``CONFIGS``, ``QS``: the repository, its configs and quick schedules. Tests import the
  scripts of ``tools/`` and ``bench/`` with ``regionssl_workbench.scripts.load_script``.
* :func:`cfg_of` / :func:`qs_cfg`: a regionssl config on CPU.
* :func:`launch_cpu`: N gloo processes through Detectron2's ``launch`` on a free local port.
* :class:`Interrupt`: a hook that stops training after a given iteration (after its checkpoint).
* Folder listings are cached in a temporary folder (``REGIONSSL_CACHE_DIR``).
* The tiny synthetic COCO / VOC sets (``tools/build_tiny_datasets.py``) are registered here, at their
  default root (built on first use); the ``tiny_root`` fixture re-registers them under a per-session
  temporary root for the tests that inspect the files.
"""
import os
import socket

import pytest
from detectron2.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
QS = os.path.join(CONFIGS, "quick_schedules")
# A guard against hangs only (a subprocess, a gloo collective, a barrier, a local Slurm job): far above
# any run's time on a busy machine, so that no test depends on the machine's speed or load.
HANG_TIMEOUT = 3600  # seconds

from regionssl_workbench import tiny_datasets as tiny  # test data: not part of the regionssl package

# Folder listings are cached under this run's temporary folder, never in the user's home
# (a test of the cache sets its own folder).
if "REGIONSSL_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["REGIONSSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="regionssl-test-cache-")
    atexit.register(shutil.rmtree, os.environ["REGIONSSL_CACHE_DIR"], True)

tiny.register_tiny_datasets()


def cfg_of(name, *opts):
    """Config ``name`` (absolute, or relative to ``configs/``) with ``opts`` merged, on CPU."""
    from regionssl.engine import get_regionssl_cfg

    path = name if os.path.isabs(name) else os.path.join(CONFIGS, name)
    cfg = get_regionssl_cfg(path, list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def qs_cfg(name, *opts):
    """:func:`cfg_of` for a file of ``configs/quick_schedules``."""
    return cfg_of(os.path.join(QS, name), *opts)


# Overrides for the guard and weight-norm tests: ResNet-18 width, a 256-wide projector, 64 px views.
R18_TRUNK = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]  # ResNet-18 instead of 50
R18 = ["MODEL.DEVICE", "cpu", *R18_TRUNK,
       "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", 256, "INPUT.REGIONSSL.CROP_SIZE", 64,
       "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60]]


def r18_cfg(name, *opts):
    """:func:`qs_cfg` with the :data:`R18` overrides, then ``opts``."""
    return qs_cfg(name, *R18, *opts)


# Overrides that make a pretraining quick schedule small and fast on a CPU: ResNet-18 width, 64 px
# views, 2 images a step, a queue of 8 (checkpoints of ~150 MB, steps of a second on a quiet core).
SMALL_PRETRAIN = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.REGIONSSL.CROP_SIZE", "64", "MODEL.REGIONSSL.QUEUE.SIZE", "8",
                  "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DEVICE", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cpu(fn, args, num_processes=2, **kwargs):
    """Run ``fn(*args)`` in ``num_processes`` gloo processes (Detectron2's ``launch``, free port)."""
    from detectron2.engine import launch

    launch(fn, num_processes, dist_url=f"tcp://127.0.0.1:{free_port()}", args=tuple(args), **kwargs)


class Interrupt(HookBase):
    """Raises :class:`Interrupt.Stop` at the end of iteration ``at_iter``; registered after the
    trainer's own hooks, it runs after the checkpointer (a preemption right after a checkpoint)."""

    class Stop(Exception):
        pass

    def __init__(self, at_iter):
        self.at_iter = at_iter

    def after_step(self):
        if self.trainer.iter == self.at_iter:
            raise self.Stop()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """One build of the tiny sets per test session under a temporary root (ensure_tiny_datasets is
    idempotent), registered under the official names; the default registration is restored after."""
    root = str(tmp_path_factory.getbasetemp() / "datasets" / "regionssl_tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("REGIONSSL_DATASETS", root)
    tiny.register_tiny_datasets(force=True)
    yield root
    mp.undo()
    tiny.register_tiny_datasets(force=True)

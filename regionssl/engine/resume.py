"""Exact resume of pretraining: the data stream and the random state travel in the checkpoint.

Detectron2's ``resume_or_load`` restores model, optimizer, scheduler and iteration, but the
data loader starts a new stream: a resumed run sees other images and other augmentations than
the run it continues. :class:`DataStateHook` is a stateful hook (its ``state_dict`` is saved
with the trainer's in every checkpoint) holding

* the sampler seed; on resume the :class:`~regionssl.data.sampler.ResumableTrainingSampler`
  continues after the ``start_iter x images per process per step`` indices already consumed (at
  that epoch and offset, by arithmetic: the cost does not grow with the epoch);
* the Python / NumPy / torch (CPU, CUDA) random states of the saving process (rank 0).

Rank 0 restores them as saved; other ranks re-seed from (seed, rank, iteration). With
``DATALOADER.NUM_WORKERS`` 0 one process then continues bit for bit as if never stopped
(tests/engine/test_slurm.py compares final weights). With loader workers or several processes, the data
position is exact but augmentations are re-drawn (workers and other ranks keep their own state).
Hooks that draw random numbers after the checkpoint is written (the retrieval probe at a
checkpoint iteration) also make the continuation differ from the uninterrupted run.
Stored as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.
"""
import logging
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from .hooks import PretrainLoader

__all__ = ["DataStateHook"]

logger = logging.getLogger(__name__)


def _rng_state():
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *(float(x) for x in np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DataStateHook(HookBase):
    """Saves and restores the data stream position and random state (see the module docstring).

    Args:
        images_per_step: images one process consumes per optimizer step (all micro-batches).
    """

    def __init__(self, images_per_step):
        self._images_per_step = images_per_step
        self._loaded = None

    def _loader(self):
        loader = self.trainer.data_loader
        return loader if isinstance(loader, PretrainLoader) else None

    def state_dict(self):
        loader = self._loader()
        sampler = loader.sampler if loader is not None else None
        return {"seed": sampler.seed if sampler is not None else -1, "rng": _rng_state()}

    def load_state_dict(self, state):
        self._loaded = state  # applied in before_train, once start_iter is known

    def before_train(self):
        state, self._loaded = self._loaded, None
        if state is None:
            return
        start = self.trainer.start_iter
        loader = self._loader()
        if loader is None:
            return
        if loader.sampler is not None and state["seed"] >= 0:
            loader.sampler.resume(int(state["seed"]), start * self._images_per_step)
        rank = comm.get_rank()

        def restore_random_state():
            if rank == 0:
                _set_rng_state(state["rng"])
            else:
                seed_all_rng((int(state["seed"]) + 1000003 * rank + 7919 * start) % 2**31)

        # torch's DataLoader draws its workers' base seed from the global generator when its iterator
        # is made (in the first step): restore after that, so the next draw is the saved one, as in
        # the uninterrupted run
        loader.at_start(restore_random_state)
        logger.info(f"Resumed the data stream at iteration {start}: {start * self._images_per_step} images "
                    "per process skipped, random state restored.")

"""Gradient accumulation in Detectron2's trainer: k micro-batches of B/k per optimizer step.

``SOLVER.REGIONSSL.ACCUMULATE`` k > 1 replaces the step runner of :class:`DefaultTrainer`
(``SimpleTrainer`` / ``AMPTrainer``) by a subclass whose ``run_step`` draws k micro-batches from
the loader (which then yields ``IMS_PER_BATCH / k`` images per step in total), backpropagates each
loss divided by k and steps the optimizer once. Hooks, checkpoints, LR schedule and iteration
count are Detectron2's: one iteration is one optimizer step. Under DDP the first k - 1 backward
passes skip the gradient all-reduce (``no_sync``).

The gradient equals the B batch's when the loss is a mean of per-sample terms and no layer couples
the samples of a batch. What couples them is listed by :func:`accumulation_differences`:
BatchNorm in training mode (incl. SyncBN and the key encoder's shuffle-BN), Sinkhorn over the
batch (SwAV), in-batch negatives (ReSim), per-region means with a varying number of regions
(SCRL, ReSim windows, Detectron2's R-CNN losses). Such a config stops with that list unless
``SOLVER.REGIONSSL.ACCUMULATE_ALLOW_DIFFERENCE`` is set, which turns it into a warning. Once-per-
step model state (EMA, queue writes) is handled by :mod:`regionssl.utils.micro_batch`.
"""
import contextlib
import logging
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils.micro_batch import micro_batch

__all__ = ["AccumulatingTrainer", "AccumulatingAMPTrainer", "accumulation_differences", "build_step_runner",
           "micro_batch_cfg"]

logger = logging.getLogger(__name__)


class _AccumulateMixin:
    """``run_step`` over ``self.accumulate`` micro-batches; subclasses give backward/step/autocast."""

    def run_step(self):
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        k = self.accumulate
        self.optimizer.zero_grad()
        totals, data_time = {}, 0.0
        for j in range(k):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = j == k - 1
            no_sync = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last else None
            with micro_batch(j, k), no_sync or contextlib.nullcontext():
                with self._autocast():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values())
                self._backward(losses / k)
            for name, value in loss_dict.items():  # logged: the mean over the k micro-batches
                totals[name] = totals.get(name, 0.0) + value.detach() / k
        self.after_backward()
        self._write_metrics(totals, data_time)
        self._step()


class _SimpleAccumulate(_AccumulateMixin):
    """Accumulation over a :class:`SimpleTrainer` (or a subclass of it)."""

    def __init__(self, model, data_loader, optimizer, accumulate, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.accumulate = accumulate

    def _autocast(self):
        return contextlib.nullcontext()

    def _backward(self, loss):
        loss.backward()

    def _step(self):
        self.optimizer.step()


class _AMPAccumulate(_SimpleAccumulate):
    """Accumulation over an :class:`AMPTrainer` (or a subclass of it): one scaler step."""

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=self.precision)

    def _backward(self, loss):
        self.grad_scaler.scale(loss).backward()

    def _step(self):
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class AccumulatingTrainer(_SimpleAccumulate, SimpleTrainer):
    """:class:`SimpleTrainer` with ``accumulate`` micro-batches per optimizer step."""


class AccumulatingAMPTrainer(_AMPAccumulate, AMPTrainer):
    """:class:`AMPTrainer` with ``accumulate`` micro-batches per optimizer step (one scaler step)."""


def _accumulating(base):
    """The accumulating version of the step runner class ``base`` (a SimpleTrainer/AMPTrainer subclass)."""
    accumulating = AccumulatingAMPTrainer if issubclass(base, AMPTrainer) else AccumulatingTrainer
    if base in (SimpleTrainer, AMPTrainer):
        return accumulating
    return type(f"Accumulating{base.__name__.lstrip('_')}", (accumulating, base), {})


def accumulation_differences(model):
    """Why k micro-batches of B/k do not give the update of one batch of B for ``model`` (list of str)."""
    bare = getattr(model, "module", model)
    reasons = []
    norms = [name for name, m in bare.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:
        shuffle = " (the key encoder's shuffle-BN permutes within each micro-batch)" if getattr(bare, "shuffle_bn", False) else ""
        reasons.append(
            f"{len(norms)} BatchNorm layers (e.g. {norms[0]}) normalise over the B/k images of a micro-batch, not B, "
            f"and update their running statistics k times per step{shuffle}"
        )
    if hasattr(bare, "batch_coupling"):
        reasons += bare.batch_coupling()
    else:  # a Detectron2 detector (fine-tuning)
        reasons.append("the R-CNN losses average over the anchors, RoIs and masks sampled in the batch, "
                       "whose numbers vary per image")
    return reasons


def micro_batch_cfg(cfg):
    """``cfg`` with ``SOLVER.IMS_PER_BATCH`` = the images of one micro-batch over all processes."""
    k = cfg.SOLVER.REGIONSSL.ACCUMULATE
    if k <= 1:
        return cfg
    world, batch = comm.get_world_size(), cfg.SOLVER.IMS_PER_BATCH
    if batch % (k * world):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({batch}) must be divisible by SOLVER.REGIONSSL.ACCUMULATE ({k}) x "
            f"the number of processes ({world})"
        )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = batch // k
    return cfg


def build_step_runner(cfg, model, data_loader, optimizer, step_classes=(SimpleTrainer, AMPTrainer)):
    """The step runner of ``step_classes`` (fp32, AMP) — Detectron2's ``SimpleTrainer``/``AMPTrainer``
    or subclasses —, or its accumulating version for ACCUMULATE > 1."""
    k = cfg.SOLVER.REGIONSSL.ACCUMULATE
    base = step_classes[int(bool(cfg.SOLVER.AMP.ENABLED))]
    if k < 1:
        raise ValueError(f"SOLVER.REGIONSSL.ACCUMULATE must be >= 1, got {k}")
    if k == 1:
        return base(model, data_loader, optimizer)
    reasons = accumulation_differences(model)
    b = cfg.SOLVER.IMS_PER_BATCH
    if reasons:
        what = (f"SOLVER.REGIONSSL.ACCUMULATE {k}: {k} micro-batches of {b // k} images do not give the update "
                f"of one batch of {b} for {type(getattr(model, 'module', model)).__name__}:\n  - " + "\n  - ".join(reasons))
        if not cfg.SOLVER.REGIONSSL.ACCUMULATE_ALLOW_DIFFERENCE:
            raise ValueError(what + "\nUse more processes, or set SOLVER.REGIONSSL.ACCUMULATE_ALLOW_DIFFERENCE True "
                             "to train with this difference.")
        logger.warning(what + "\nTraining anyway (SOLVER.REGIONSSL.ACCUMULATE_ALLOW_DIFFERENCE).")
    else:
        logger.info(f"Gradient accumulation: {k} micro-batches of {b // k} images per step = one batch of {b}.")
    return _accumulating(base)(model, data_loader, optimizer, accumulate=k)

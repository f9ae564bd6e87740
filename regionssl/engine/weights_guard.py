"""Never write a checkpoint of diverged weights.

Detectron2 stops a run whose *loss* is not finite, but by then the weights written at the last
checkpoint may already hold NaN/Inf or values grown by orders of magnitude, and ``--resume``
continues from them. :class:`WeightsGuard` runs just before the checkpointer at every iteration
that saves, and stops the run (:class:`WeightsDiverged`, naming the tensor) instead of saving when

* a floating-point tensor of the model's state (parameters and buffers: queues, BN statistics)
  is not finite, or
* the norm of all parameters together grew more than ``MAX_NORM_GROWTH`` times since the start
  of the run (``TEST.REGIONSSL.WEIGHTS_GUARD``; 0 turns this part off).

The previous checkpoint stays the last one, so ``--resume`` (e.g. with a lower learning rate)
continues from healthy weights.
"""
import math

import torch
from detectron2.engine import HookBase

__all__ = ["WeightsDiverged", "WeightsGuard", "check_weights"]


class WeightsDiverged(FloatingPointError):
    """The weights are not finite or exploded; nothing was saved."""


def _parameter_norms(model):
    return {name: float(p.detach().float().norm()) for name, p in model.named_parameters()}


def _total(norms):
    return math.sqrt(sum(n * n for n in norms.values()))


def check_weights(model, start_norms=None, max_norm_growth=0.0):
    """Raise :class:`WeightsDiverged` if ``model``'s state is not finite, or (with ``start_norms``,
    {name: norm} at the start, and ``max_norm_growth`` > 0) its parameters' total norm grew more than
    that factor. Returns the current {name: norm}."""
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsDiverged(f"{name} holds {bad} non-finite values (NaN/Inf)")
    norms = _parameter_norms(model)
    if start_norms and max_norm_growth > 0:
        before, now = _total(start_norms), _total(norms)
        if before > 0 and now > max_norm_growth * before:
            grown = {k: norms[k] / start_norms[k] for k in norms if start_norms.get(k, 0) > 0}
            worst = max(grown, key=grown.get) if grown else "?"
            raise WeightsDiverged(
                f"the parameters' total norm grew {now / before:.3g}x since the start of the run ({before:.4g} -> "
                f"{now:.4g}; most: {worst}, {grown.get(worst, float('nan')):.3g}x), beyond "
                f"TEST.REGIONSSL.WEIGHTS_GUARD.MAX_NORM_GROWTH = {max_norm_growth:g}")
    return norms


class WeightsGuard(HookBase):
    """Checks the weights at every iteration the checkpointer saves, before it does (register it
    right before ``PeriodicCheckpointer``). On every process: all stop together.

    Args:
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD`` (a save after iteration i if (i + 1) % period
            == 0, and after the last one, as Detectron2's PeriodicCheckpointer).
        max_norm_growth: ``TEST.REGIONSSL.WEIGHTS_GUARD.MAX_NORM_GROWTH`` (0 = only the finiteness check).
    """

    def __init__(self, checkpoint_period, max_norm_growth):
        self.period, self.max_norm_growth = int(checkpoint_period), float(max_norm_growth)
        self._start = None

    def _model(self):
        return getattr(self.trainer.model, "module", self.trainer.model)

    def before_train(self):
        self._start = _parameter_norms(self._model())

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period != 0 and it < self.trainer.max_iter - 1:
            return
        try:
            check_weights(self._model(), self._start, self.max_norm_growth)
        except WeightsDiverged as e:
            raise WeightsDiverged(
                f"Iteration {it}: {e}. The run stops without saving these weights; the last checkpoint is the "
                "previous one. Resume from it (--resume) with a lower SOLVER.BASE_LR, or check the data.") from None

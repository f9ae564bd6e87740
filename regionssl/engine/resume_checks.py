"""Solver keys changed between a checkpoint and the run that resumes from it.

On ``--resume`` Detectron2 loads the optimizer's state, whose parameter groups carry their learning
rate, momentum and weight decay, and the LR scheduler's ``base_lrs``: a new ``SOLVER.BASE_LR`` (or
momentum, weight decay, LARS setting) given with ``--resume`` would be silently ignored. The
schedule's shape (``MAX_ITER``, ``STEPS``, warm-up, ...) and everything else in ``SOLVER`` is read
from the config and does apply.

:class:`SolverKeysOnResume` saves the run's ``SOLVER`` keys in every checkpoint (as hook state)
and, when a checkpoint is resumed, compares: a changed key of :data:`REFUSED_ON_RESUME` stops the
run (:class:`ResumeConfigError`, naming key, both values and what to do); any other changed key
is logged as applied.
"""
import logging

from detectron2.engine import HookBase

__all__ = ["REFUSED_ON_RESUME", "ResumeConfigError", "SolverKeysOnResume", "solver_keys"]

logger = logging.getLogger(__name__)

# keys whose value lives in the optimizer / scheduler state a resume loads (it overrides the config)
REFUSED_ON_RESUME = (
    "SOLVER.BASE_LR", "SOLVER.MOMENTUM", "SOLVER.NESTEROV", "SOLVER.WEIGHT_DECAY", "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_BIAS", "SOLVER.BIAS_LR_FACTOR", "SOLVER.REGIONSSL.OPTIMIZER", "SOLVER.REGIONSSL.LARS_TRUST",
    "SOLVER.REGIONSSL.LARS_EXCLUDE_BIAS_AND_NORM", "SOLVER.REGIONSSL.LARS_EXCLUDE_NAMES",
    "SOLVER.REGIONSSL.LARS_EXCLUDED_GRAD_TIMES_LR",
)


class ResumeConfigError(ValueError):
    """A solver key changed on resume whose new value would be ignored."""


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def solver_keys(cfg):
    """{"SOLVER.X[.Y]": value} of ``cfg.SOLVER`` (tuples as lists: what a checkpoint round-trips)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = _plain(value)

    walk(cfg.SOLVER, "SOLVER.")
    return out


class SolverKeysOnResume(HookBase):
    """Saves ``SOLVER`` with every checkpoint; on resume, refuses or reports what changed (module docstring).

    Args:
        cfg: the run's config, after Detectron2's REFERENCE_WORLD_SIZE scaling (what the run uses).
    """

    def __init__(self, cfg):
        self._keys = solver_keys(cfg)

    def state_dict(self):
        return {"solver": dict(self._keys)}

    def load_state_dict(self, state):
        saved = state.get("solver", {})
        changed = {k: (saved[k], v) for k, v in self._keys.items() if k in saved and _plain(saved[k]) != v}
        refused = [k for k in changed if k in REFUSED_ON_RESUME]
        if refused:
            lines = "; ".join(f"{k}: {changed[k][0]!r} in the checkpoint, {changed[k][1]!r} now" for k in refused)
            raise ResumeConfigError(
                f"Changed on resume: {lines}. The optimizer and scheduler state of the checkpoint carry the old "
                "value, so the new one would be ignored. Resume with the old value, or start a new run (another "
                "OUTPUT_DIR) with MODEL.WEIGHTS set to the checkpoint.")
        for k, (old, new) in changed.items():
            logger.warning(f"{k} changed on resume: {old!r} in the checkpoint, {new!r} now (applied).")

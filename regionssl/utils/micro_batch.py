"""Which micro-batch of an optimizer step is running (gradient accumulation).

With ``SOLVER.REGIONSSL.ACCUMULATE`` k, one optimizer step runs the model k times on micro-batches
of B/k images (:class:`~regionssl.engine.accumulate.AccumulatingTrainer`). What the methods do
once per step must stay once per step, so the update matches one batch of B:

* the EMA of the momentum/target encoder runs in the first micro-batch only
  (:meth:`RegionSSLBase.update_momentum`): every micro-batch's keys/targets come from the same
  target, as the B batch's do;
* queue writes (MoCo/InsLoc/ReSim key queues, the SwAV feature queue) are collected with
  :func:`rows_at_step_end` and written after the last micro-batch, concatenated in micro-batch
  order: the queue then holds exactly what one B batch writes, and no micro-batch sees keys of
  its own step among its negatives;
* SwAV's prototype normalisation runs in the first micro-batch (the weights do not change
  between micro-batches).

Per method:

========================  ==========================================  ==============================
method                    once per optimizer step                     still per micro-batch
========================  ==========================================  ==============================
MoCo-v2, InsLoc, ReSim    EMA (before the keys), key-queue writes     BN statistics (shuffle-BN)
BYOL, SCRL, CVSA          EMA owed for the previous step (tau_{k-1})  BN statistics
SwAV (+ region)           prototype normalisation, queue writes       Sinkhorn codes, BN statistics
========================  ==========================================  ==============================

Schedules (momentum, prototype freezing, queue start) read the global iteration, which counts
optimizer steps, so they are unchanged. Diagnostics (``regionssl/*``) are logged per micro-batch.
What stays per micro-batch makes the update differ from the large batch; the trainer refuses such
configs unless told otherwise (:mod:`regionssl.engine.accumulate`).

Outside accumulation (k = 1, tests, probes) every function behaves as "the only micro-batch".
"""
import contextlib

import torch

__all__ = ["micro_batch", "is_first_micro_batch", "is_last_micro_batch", "rows_at_step_end"]


class _State:
    index, count = 0, 1
    pending = {}


_state = _State()


@contextlib.contextmanager
def micro_batch(index, count):
    """Mark the code inside as micro-batch ``index`` (0-based) of ``count`` in one optimizer step."""
    previous = (_state.index, _state.count)
    if index == 0:
        _state.pending = {}
    _state.index, _state.count = index, count
    try:
        yield
    finally:
        _state.index, _state.count = previous


def is_first_micro_batch():
    return _state.index == 0


def is_last_micro_batch():
    return _state.index == _state.count - 1


def rows_at_step_end(owner, key, rows):
    """Defer rows that are written once per optimizer step.

    Args:
        owner, key: identify the buffer (e.g. a queue module and its level).
        rows: (N, ...) this micro-batch's rows (detached).
    Returns:
        ``rows`` outside accumulation; during accumulation None before the last micro-batch, then
        the (k N, ...) rows of all micro-batches in order (the B batch's rows, in its order).
    """
    if _state.count <= 1:
        return rows
    pending = _state.pending.setdefault((id(owner), key), [])
    pending.append(rows)
    if not is_last_micro_batch():
        return None
    del _state.pending[(id(owner), key)]
    return torch.cat(pending)

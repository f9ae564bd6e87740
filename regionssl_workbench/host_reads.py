"""Count the host reads of device tensors (GPU syncs) that Python code makes, on any machine.

A read of a device tensor's *values* by the host (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``,
``.cpu()``, and every op whose output size depends on the data: ``nonzero``, ``unique``, boolean
masks, ``repeat_interleave`` without ``output_size``) makes the CPU wait until the GPU has finished
all queued work: a synchronisation that stalls the launch pipeline. :class:`HostReadCounter` is a
``TorchFunctionMode`` that sees every torch call made from Python and counts those reads.

On a GPU run every tensor knows its device. On CPU all tensors are CPU tensors, so the counter
*simulates* the split: a tensor is "host" if it is one of the given host tensors (the loader's batch),
comes from ``.cpu()``, is made by a factory without ``device=`` (``torch.arange(n)``), or is computed
from host tensors only; everything else (parameters, buffers, anything made with ``device=`` or moved
with ``.to(device)``) is "device". Reads of host tensors are free and not counted. Reads inside
``torch.distributed`` object collectives are not counted either: Detectron2's ``comm.gather`` runs
them on its CPU gloo group. Reads made by C++ code (e.g. a tensor passed where an ``int`` is
expected) are invisible to Python and not counted.

Use::

    with HostReadCounter(host_tensors=batch) as counter:
        trainer.run_step()
    counter.total, counter.where  # Counter of "file:line (op)" -> reads
"""
import collections
import os
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostReadCounter"]

# Ops that hand a device tensor's values to Python.
_READS = {
    "item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__", "__array__",
    "__format__", "__repr__", "__contains__", "cpu", "equal", "allclose", "is_nonzero",
}
# Ops whose output size depends on the data (the host must learn it before allocating).
_DATA_SIZED = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"}
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_DIST = os.path.join(_TORCH, "distributed")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of device tensors made from Python while active (see the module docstring).

    Args:
        host_tensors: tensors (or nested lists/dicts of them, e.g. a loader batch) living on the host.
        simulate: classify host/device tensors by the rules above (True) or by ``tensor.device``
            (False). Default: simulate when CUDA is not available.
    Attributes:
        total: number of reads counted.
        where: ``collections.Counter`` of ``"file:line (op)"`` -> reads, the first frame outside torch.
    """

    def __init__(self, host_tensors=(), simulate=None):
        super().__init__()
        self.simulate = (not torch.cuda.is_available()) if simulate is None else simulate
        self._host = weakref.WeakValueDictionary()
        self.total, self.where = 0, collections.Counter()
        for t in _tensors(host_tensors):
            self._mark(t)

    def _mark(self, t):
        self._host[id(t)] = t

    def is_host(self, t):
        if not self.simulate:
            return t.device.type == "cpu"
        return self._host.get(id(t)) is t

    def _count(self, name):
        frame = sys._getframe(2)
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((_TORCH, _HERE)):
            if os.path.abspath(frame.f_code.co_filename).startswith(_DIST):
                return  # object collectives of torch.distributed (gloo group): host tensors
            frame = frame.f_back
        where = "?" if frame is None else f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"
        self.total += 1
        self.where[f"{where} ({name})"] += 1

    def _is_read(self, name, args, kwargs, device_in):
        if not device_in:
            return False
        if name in _READS:
            return name != "__format__" or args[0].dim() == 0
        if name in _DATA_SIZED:
            return True
        if name == "repeat_interleave":
            return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and (
                kwargs.get("output_size") is None
            )
        if name in ("__getitem__", "__setitem__"):  # boolean mask on the device
            index = args[1]
            return any(t.dtype == torch.bool and not self.is_host(t) for t in _tensors(index))
        return False

    def _is_blocking_copy(self, name, args, kwargs, inputs, device_in):
        """A host -> device copy without ``non_blocking=True``: PyTorch then synchronises the stream."""
        if inputs and device_in:
            return False  # the source is already on the device
        if name in ("tensor", "as_tensor"):  # Python data or a host tensor, made on a device
            device = kwargs.get("device")
            return device is not None and (self.simulate or torch.device(device).type != "cpu")
        if name == "to" and not kwargs.get("non_blocking", False) and not any(a is True for a in args[2:]):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
            return target is not None and (self.simulate or torch.device(target).type != "cpu")
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        device_in = [t for t in inputs if not self.is_host(t)]
        if self._is_read(name, args, kwargs, device_in):
            self._count(name)
        elif self._is_blocking_copy(name, args, kwargs, inputs, device_in):
            self._count(f"{name}, blocking copy to the device")
        out = func(*args, **kwargs)
        if not self.simulate:
            return out
        on_host = self._result_on_host(name, args, kwargs, inputs, device_in)
        if name in ("to", "cpu") and out is args[0] and on_host != self.is_host(out):
            out = out.view_as(out)  # a CPU -> CPU "move" returns its input: give the copy its own identity
        if on_host:
            for t in _tensors(out):
                self._mark(t)
        return out

    @staticmethod
    def _result_on_host(name, args, kwargs, inputs, device_in):
        if name in ("cpu", "pin_memory"):
            return True
        if name == "to":
            moves = kwargs.get("device") is not None or any(
                isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:]
            )
            return not moves and not device_in
        if kwargs.get("device") is not None:
            return False
        return not device_in  # factories without device=, or computed from host tensors only


def count_trainer_step(trainer, batch):
    """Run one iteration of a Detectron2 trainer (hooks included) on ``batch``; return its counter.

    The trainer (a regionssl trainer: it exposes ``step_runner``) must be inside its ``EventStorage``
    with ``before_train`` done. Loading the batch is
    not part of the count: the loader's output is given as the host tensors.
    """
    trainer.step_runner.reset_data_loader(lambda: iter([batch]))
    with HostReadCounter(host_tensors=batch) as counter:
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()
    trainer.iter += 1
    return counter

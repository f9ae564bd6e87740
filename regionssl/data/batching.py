"""A worker batch as a few tensors: every tensor of every sample packed into one flat buffer per dtype.

Shipping a batch of B mapped dicts from a loader worker costs one shared-memory descriptor per
tensor (V views + V boxes + valid + groups + ... per sample: ~200 for 32 two-view samples), and
torch's DataLoader keeps several batches per worker in flight. :func:`pack_batch` (the loader's
``collate_fn``, run in the worker) copies the tensors into one buffer per dtype (uint8 views,
float32 boxes, bool, int64: about four), with the layout and the plain values (file names, sizes)
in plain Python. :meth:`PackedBatch.unpack` (in the training process) gives back the list of dicts
the models take, each tensor a view into the buffers: no copy. The rows of one key are adjacent
(key by key, then sample by sample), so view v of all samples is one (B, 3, H, W) block:
:func:`stacked_rows` finds it and the model moves it to the device in one transfer.
"""
import torch
from torch.utils.data import get_worker_info

__all__ = ["PackedBatch", "pack_batch", "stacked_rows"]


class _Slot:
    """Where one tensor lives in the buffers (``dtype``, element ``offset``, ``shape``)."""

    __slots__ = ("dtype", "offset", "shape")

    def __init__(self, dtype, offset, shape):
        self.dtype, self.offset, self.shape = dtype, offset, shape

    def __getstate__(self):
        return self.dtype, self.offset, self.shape

    def __setstate__(self, state):
        self.dtype, self.offset, self.shape = state


class PackedBatch:
    """B samples as ``buffers`` (dtype -> 1-D tensor) and ``samples`` (the dicts, each tensor replaced
    by a :class:`_Slot`, each list of tensors by a list of slots)."""

    def __init__(self, buffers, samples):
        self.buffers, self.samples = buffers, samples

    def __len__(self):
        return len(self.samples)

    def pin_memory(self, device=None):
        """Pinned copy of the buffers (torch's DataLoader pin thread calls this): one copy per dtype."""
        return PackedBatch({k: b.pin_memory() for k, b in self.buffers.items()}, self.samples)

    def _tensor(self, slot):
        numel = 1
        for s in slot.shape:
            numel *= s
        return self.buffers[slot.dtype][slot.offset : slot.offset + numel].view(slot.shape)

    def unpack(self):
        """The list of B mapped dicts; tensors are views into the buffers."""
        out = []
        for sample in self.samples:
            d = {}
            for key, value in sample.items():
                if isinstance(value, _Slot):
                    value = self._tensor(value)
                elif isinstance(value, list) and value and isinstance(value[0], _Slot):
                    value = [self._tensor(s) for s in value]
                d[key] = value
            out.append(d)
        return out


def _is_tensor_list(value):
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(torch.is_tensor(t) for t in value)


def pack_batch(samples):
    """List of mapped dicts -> :class:`PackedBatch` (the loader's ``collate_fn``, in the worker).

    Values that are tensors or non-empty lists of tensors are packed; everything else travels as is.
    In a loader worker the buffers are made in shared memory directly.
    """
    tensors = {}  # (key, list position or None) -> [(sample, position, tensor)], in order of first appearance
    skeletons = []
    for i, sample in enumerate(samples):
        skeleton = dict(sample)
        for key, value in sample.items():
            if torch.is_tensor(value):
                tensors.setdefault((key, None), []).append((i, None, value))
            elif _is_tensor_list(value):
                skeleton[key] = [None] * len(value)
                for j, t in enumerate(value):
                    tensors.setdefault((key, j), []).append((i, j, t))
        skeletons.append(skeleton)

    parts, sizes = {}, {}
    for (key, _), entries in tensors.items():
        for i, j, t in entries:
            slot = _Slot(t.dtype, sizes.get(t.dtype, 0), tuple(t.shape))
            sizes[t.dtype] = slot.offset + t.numel()
            parts.setdefault(t.dtype, []).append(t.reshape(-1))
            if j is None:
                skeletons[i][key] = slot
            else:
                skeletons[i][key][j] = slot
    in_worker = get_worker_info() is not None
    buffers = {}
    for dtype, flat in parts.items():
        buffer = torch.empty(sizes[dtype], dtype=dtype)
        if in_worker:
            buffer.share_memory_()  # sent to the training process without another copy
        torch.cat(flat, out=buffer)
        buffers[dtype] = buffer
    return PackedBatch(buffers, skeletons)


def stacked_rows(tensors):
    """The (N, *shape) tensor whose rows are ``tensors`` if they are N adjacent equal-shape blocks
    of one storage (as :meth:`PackedBatch.unpack` gives view v of all samples), else None."""
    if not tensors:
        return None
    first = tensors[0]
    if not first.is_contiguous():
        return None
    numel, ptr = first.numel(), first.untyped_storage().data_ptr()
    for k, t in enumerate(tensors):
        if (t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != first.storage_offset() + k * numel):
            return None
    return first.as_strided((len(tensors), *first.shape), (numel, *first.stride()), first.storage_offset())

"""A digest of a checkpoint's contents, written into it and checked when it is read.

torch's zip reader does not check the CRCs of the records it reads: a region of a tensor that
changed on disk (a flipped block, a bad copy) loads silently. The checkpointer stores
:func:`state_digest` of everything it saves under :data:`DIGEST_KEY`; reading recomputes it.
"""
import hashlib

import numpy as np
import torch

__all__ = ["DIGEST_KEY", "state_digest"]

DIGEST_KEY = "regionssl_digest"


def _update(h, value):
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _update(h, k)
            _update(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for v in value:
            _update(h, v)
    elif isinstance(value, (set, frozenset)):  # iteration order of strings differs between processes
        h.update(f"S{len(value)}".encode())
        for r in sorted(repr(v) for v in value):
            h.update(r.encode())
    else:  # numbers, strings, None, bools: their repr round-trips through the checkpoint exactly
        h.update(f"V{type(value).__name__}:{value!r};".encode())


def state_digest(state):
    """BLAKE2b hex digest of ``state`` (nested dicts / lists / tuples of tensors, arrays and plain
    values): tensor bytes, dtypes and shapes, keys and values, in order."""
    h = hashlib.blake2b(digest_size=20)
    _update(h, state)
    return h.hexdigest()

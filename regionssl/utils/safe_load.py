"""Reading weight files without running code in them.

A ``.pth`` / ``.pkl`` file is a pickle, and unpickling calls whatever functions the file names:
opening a checkpoint downloaded from the internet can run any code. Every file regionssl reads
as weights (``MODEL.WEIGHTS``, resume, the importer and the tools) goes through this module:

* ``.pth`` (torch's zip format): ``torch.load(weights_only=True)``, which admits tensors and
  plain containers, plus numpy arrays (as the ``.pkl`` reader below);
* ``.pkl`` (Detectron2's model zoo format): a restricted unpickler that admits numpy arrays,
  tensors and plain containers only (:data:`PICKLE_GLOBALS`).

Anything else (a class, a function such as ``os.system``) stops the load with
:class:`CheckpointReadError` naming the file and the refused name; so does a truncated, empty or
garbled file. Configs are read without Python YAML tags (``regionssl.engine.setup``).
"""
import importlib
import io
import os
import pickle
import re

import numpy as np
import torch

__all__ = ["CheckpointReadError", "PICKLE_GLOBALS", "load_torch_file", "load_pickle_file", "load_weights_file"]


class CheckpointReadError(OSError):
    """A weight file that cannot be read safely or at all; the message names the file."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason
        super().__init__(f"Cannot read {path}: {reason}")


def _safe_load_from_bytes(data):
    """``torch.storage._load_from_bytes`` (how plain pickle stores a tensor's storage), read with
    ``weights_only=True`` (torch's own reads it with ``weights_only=False``)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_reconstruct():
    return [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"), ("numpy", "dtype")]


# (module, name) a .pkl may name; a value replaces what the module holds (None: the module's own).
PICKLE_GLOBALS = {
    ("collections", "OrderedDict"): None,
    ("builtins", "set"): None, ("builtins", "frozenset"): None,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,  # Python 2 pickles
    ("_codecs", "encode"): None,  # str -> bytes of Python 2 byte strings (numpy array data)
    ("torch._utils", "_rebuild_tensor_v2"): None,
    ("torch._utils", "_rebuild_parameter"): None,
    ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
    **{key: None for key in _numpy_reconstruct()},
}


def _numpy_safe_globals():
    """numpy's array/scalar rebuild functions, for torch's weights-only unpickler."""
    out = []
    numpy_2 = hasattr(np, "_core")
    for module, name in _numpy_reconstruct():
        if numpy_2 and module.startswith("numpy.core"):  # an alias of numpy._core there (deprecated)
            continue
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # numpy 1 has no numpy._core, numpy 2 warns for numpy.core
            continue
    # numpy 2 pickles dtypes as instances of numpy.dtypes.*DType classes
    out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")]
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        key = (module, name)
        if key not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        value = PICKLE_GLOBALS[key]
        return value if value is not None else getattr(importlib.import_module(module), name)


_REFUSED = re.compile(r"(?:refused global|Unsupported global: GLOBAL) ([\w.]+)")
_UNSAFE_REASON = ("it names {what}, which is neither a tensor, a numpy array nor a plain container; "
                  "unpickling it could run code, so it is not read. Re-save the weights alone (a dict of "
                  "tensors) with the tool that made the file, if you trust its source.")


def _reason(path, error):
    """One readable line for a failed unpickling of ``path`` (no advice to load it unsafely)."""
    if os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    text = str(error)
    refused = _REFUSED.search(text)
    if refused:
        return _UNSAFE_REASON.format(what=refused.group(1))
    if isinstance(error, EOFError) or "central directory" in text or "failed reading" in text:
        return f"the file is truncated or not a checkpoint ({type(error).__name__})"
    first = next((line.strip() for line in reversed(text.splitlines()) if "Unsupported" in line), "")
    return f"not a valid checkpoint ({type(error).__name__}{': ' + first if first else ''})"


def load_torch_file(path):
    """``torch.load(path, weights_only=True)`` on the CPU (numpy arrays admitted); CheckpointReadError
    naming the file if it holds anything else, or is empty, truncated or garbled."""
    if not os.path.isfile(path):
        raise CheckpointReadError(path, "no such file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointReadError(path, _reason(path, e)) from None


def load_pickle_file(path):
    """A ``.pkl`` read by the restricted unpickler (:data:`PICKLE_GLOBALS`; Python 2 byte strings as
    latin-1, as Detectron2 reads its model zoo); CheckpointReadError naming the file otherwise."""
    if not os.path.isfile(path):
        raise CheckpointReadError(path, "no such file")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            RuntimeError, UnicodeDecodeError, ImportError) as e:
        raise CheckpointReadError(path, _reason(path, e)) from None


def load_weights_file(path):
    """:func:`load_pickle_file` for ``.pkl``, :func:`load_torch_file` for anything else."""
    return load_pickle_file(path) if path.endswith(".pkl") else load_torch_file(path)

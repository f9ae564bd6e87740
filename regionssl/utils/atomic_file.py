"""Write a file so that it is either the old version or the complete new one, never torn.

The bytes go to a temporary file in the same folder (same file system, so the rename is atomic),
are flushed and fsync'ed, and the temporary file is renamed over the target; the folder is
fsync'ed so the rename survives a power loss. A kill or a write error (disk full: ENOSPC, file too
large: EFBIG) before the rename leaves the previous file untouched; the temporary file is removed
on an error, and a leftover of a killed writer is removed by the next write of the same target.
"""
import contextlib
import glob
import os

__all__ = ["atomic_write", "temporary_name"]


def temporary_name(path):
    """``.NAME.tmp.PID`` beside ``path``: hidden, and never ``*.pth`` (not listed as a checkpoint)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp.{os.getpid()}")


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """``with atomic_write(path, "wb") as f: f.write(...)``: ``path`` is replaced only when the block
    ends without an error (``mode``: "w" or "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', not {mode!r}")
    folder, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp.*")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)

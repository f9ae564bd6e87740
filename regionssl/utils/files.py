"""Small file helpers shared by the library, dataset builders and tools."""
import contextlib
import functools
import hashlib
import os

__all__ = ["file_sha1", "file_lock"]


def file_sha1(path, chunk=1 << 22):
    """SHA-1 hex digest of a file's bytes, read in chunks (checkpoints are hundreds of MB).

    Remembered per (path, size, modification time) within the process: the transfer benchmark
    asks for each checkpoint's digest when it checks its inputs and again when it runs; a file
    rewritten in between has a new modification time and is read again."""
    st = os.stat(path)
    return _sha1_of(os.path.abspath(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=256)
def _sha1_of(path, size, mtime_ns, chunk):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path):
    """Exclusive inter-process lock (POSIX flock); a no-op where fcntl is unavailable (writers then
    rely on an atomic rename alone)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

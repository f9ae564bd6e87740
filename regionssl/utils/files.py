"""Small file helpers shared by dataset builders and tools."""
import hashlib

__all__ = ["file_sha1"]


def file_sha1(path, chunk=1 << 22):
    """SHA-1 hex digest of a file's bytes, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

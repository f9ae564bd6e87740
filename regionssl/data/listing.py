"""Image listings at scale: a folder's listing cached on disk, and text files of paths.

Listing ImageNet-1k (1.28M files) takes seconds per process, ImageNet-22k (14M) minutes, and every
process of a run lists at once, all hitting the filesystem's metadata server. :func:`cached_listing`
lists a folder once and writes the listing atomically into the cache folder; later calls (the other
processes of the run, the next run) read it back. It stays valid while no directory of the tree has
changed: adding, removing or renaming an entry changes its directory's modification time, so
validation is one ``stat`` per directory (1,001 for ImageNet-1k) instead of reading 1.28M entries.

Cache folder: ``$REGIONSSL_CACHE_DIR/listings`` (default ``~/.cache/regionssl/listings``; set
``REGIONSSL_CACHE_DIR`` to an empty string to list every time). One file per folder, named by the
hash of its absolute path: a JSON header line (format, root, directories and their modification
times), then one path per line, relative to the root.
"""
import hashlib
import json
import logging
import os
import tempfile
import time

from ..utils.files import file_lock

__all__ = ["cached_listing", "listing_cache_dir", "read_file_list"]

logger = logging.getLogger(__name__)

_FORMAT = 1
# A directory modified this close to the listing's start may change again within its timestamp's
# resolution (1-2 s on some filesystems) without its time changing: such a listing is not cached.
_SETTLE_NS = 2_000_000_000


def listing_cache_dir():
    """The folder listings are cached in, or None when caching is off (``REGIONSSL_CACHE_DIR=""``)."""
    root = os.environ.get("REGIONSSL_CACHE_DIR")
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "regionssl")
    return os.path.join(os.path.expanduser(root), "listings") if root else None


def _mtimes(root, dirs):
    """{relative dir: st_mtime_ns}; None if one is gone."""
    out = {}
    for d in dirs:
        try:
            out[d] = os.stat(os.path.join(root, d)).st_mtime_ns
        except OSError:
            return None
    return out


def _read_cache(path, root):
    """The cached listing of ``root`` at ``path`` if it is still valid, else None."""
    try:
        with open(path) as f:
            header = json.loads(f.readline())
            if header.get("format") != _FORMAT or header.get("root") != root:
                return None
            if _mtimes(root, header["mtimes"]) != header["mtimes"]:
                return None
            files = [os.path.join(root, line.rstrip("\n")) for line in f]
    except (OSError, ValueError, KeyError):
        return None
    return files if len(files) == header.get("count") else None  # a torn file reads short


def _write_cache(path, root, files, mtimes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".listing-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"format": _FORMAT, "root": root, "count": len(files), "mtimes": mtimes}) + "\n")
            prefix = len(os.path.join(root, ""))
            f.writelines(name[prefix:] + "\n" for name in files)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cached_listing(root, list_files, clock_ns=time.time_ns):
    """``list_files(root, dirs)`` (sorted paths under ``root``), read from the cache while ``root`` is unchanged.

    The first process to take the cache file's lock lists and writes it; processes waiting on the
    lock then read it. Without a usable cache folder (off, read-only) it lists, with a warning.

    Args:
        root: the folder.
        list_files: ``(root, dirs) -> list of paths under root``, appending every directory it
            read to the list ``dirs`` (its absolute path; all of them, also those without images).
        clock_ns: wall clock in ns (the listing's start time; tests pass a fixed one).
    """
    root = os.path.abspath(root)
    cache = listing_cache_dir()
    if cache is None:
        return list_files(root, [])
    path = os.path.join(cache, hashlib.sha1(root.encode()).hexdigest() + ".txt")
    files = _read_cache(path, root)
    if files is not None:
        return files
    try:
        os.makedirs(cache, exist_ok=True)
        lock = file_lock(path + ".lock")
        lock.__enter__()
    except OSError as e:
        logger.warning(f"Listing {root} without a cache: cannot use the cache folder {cache} ({e}).")
        return list_files(root, [])
    try:
        files = _read_cache(path, root)  # another process listed while this one waited
        if files is not None:
            return files
        started = clock_ns()
        dirs = []
        files = list_files(root, dirs)
        mtimes = _mtimes(root, sorted(os.path.relpath(d, root) if d != root else "" for d in dirs))
        if mtimes is None or max(mtimes.values()) > started - _SETTLE_NS:
            logger.info(f"Not caching the listing of {root}: it changed while being listed or just before.")
            return files
        try:
            _write_cache(path, root, files, mtimes)
            logger.info(f"Cached the listing of {root} ({len(files)} images) in {path}")
        except OSError as e:
            logger.warning(f"Could not cache the listing of {root} in {path}: {e}")
        return files
    finally:
        lock.__exit__(None, None, None)


def read_file_list(list_file):
    """Image paths from a text file, one per line (``filelist:<file>`` datasets).

    Relative paths are relative to the list file's folder; blank lines and lines starting with
    ``#`` are skipped. The files are not opened here (14M ``stat`` calls would cost minutes): a
    missing or unreadable one is skipped by the loader with a warning naming it.
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"File list {list_file!r} does not exist (filelist:<text file of image paths>).")
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file) as f:
        files = [os.path.join(base, line) for line in (raw.strip() for raw in f) if line and not line.startswith("#")]
    if not files:
        raise ValueError(f"File list {list_file!r} names no images.")
    return files

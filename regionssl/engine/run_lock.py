"""One run per ``OUTPUT_DIR``.

Two runs writing one folder interleave their logs and overwrite each other's checkpoints. The
main process of a run holds ``OUTPUT_DIR/run.lock`` while it runs: an exclusive ``flock`` on the
file (released by the kernel when the process ends, however it ends) and, in the file, who holds
it (JSON: host, pid, the pid's start time, Slurm job id, command, start time). A second run stops
with a message naming the first. A lock file left by a run that is gone is taken over with a
warning naming that run.

Where the file system has no ``flock`` (some cluster file systems), the owner written in the file
decides: a lock of this host whose pid no longer runs (or now runs another program) is stale, as
is one of the same Slurm job id (a requeued job continues on another node); a lock of another host
stops the run with a message naming host and pid, and to delete the file if that run has ended.
"""
import contextlib
import json
import logging
import os
import socket
import sys
import time

__all__ = ["LOCK_FILE", "OutputDirLocked", "output_dir_lock", "acquire", "release"]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class OutputDirLocked(RuntimeError):
    """Another run holds the output folder."""


def _process_start_time(pid):
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner():
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(owner):
    slurm = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"host {owner.get('host')}, pid {owner.get('pid')}{slurm}, started {owner.get('started')}, "
            f"command: {owner.get('command')}")


def _stale_reason(owner, me):
    """Why the lock of ``owner`` no longer protects a run (None: it may still run)."""
    if owner.get("slurm_job_id") and owner.get("slurm_job_id") == me["slurm_job_id"]:
        return "an earlier attempt of this Slurm job (requeued)"
    if owner.get("host") != me["host"]:
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return "no valid pid"
    if pid == me["pid"] and owner.get("pid_start") == me["pid_start"]:
        return "this process"
    if not _pid_alive(pid):
        return f"pid {pid} no longer runs"
    start = _process_start_time(pid)
    if owner.get("pid_start") is not None and start is not None and start != owner.get("pid_start"):
        return f"pid {pid} now belongs to another program"
    return None


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_held = {}  # lock path -> open file of this process


def _try_flock(f):
    """True: this process now holds the flock; False: another process does; None: no flock here."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: the file system does not lock
        return None
    return True


def _locked_message(output_dir, path, owner):
    return (f"OUTPUT_DIR {output_dir} is in use by another run ({_describe(owner)}). Two runs in one folder "
            f"overwrite each other's checkpoints: wait for it to end, or give another OUTPUT_DIR. If that run "
            f"has ended (e.g. its machine went down), delete {path}.")


def acquire(output_dir):
    """Take ``output_dir``'s lock for this process (kept until :func:`release`); returns its path.

    Raises:
        OutputDirLocked naming the run that holds it.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    me = _owner()
    while True:
        f = open(path, "a+")
        locked = _try_flock(f)
        f.seek(0)
        try:
            owner = json.loads(f.read() or "null")
        except ValueError:
            owner = {"host": "?", "pid": "?", "command": "(unreadable lock file)"}
        if locked is False or (locked is None and owner and _stale_reason(owner, me) is None):
            f.close()
            raise OutputDirLocked(_locked_message(output_dir, path, owner or {}))
        try:
            same_file = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its owner removed it as we opened it: take the new one
            f.close()
            continue
        break
    if owner:
        reason = _stale_reason(owner, me) or "its flock was released"
        logger.warning(f"Taking over the lock of {output_dir} from a run that is gone ({reason}; {_describe(owner)}).")
    f.seek(0)
    f.truncate()
    json.dump(me, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
    _held[path] = f
    return path


def release(path):
    """Remove the lock if this process holds it."""
    f = _held.pop(path, None)
    if f is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # before the flock goes: a waiting run then opens a new file, not this one
    f.close()


@contextlib.contextmanager
def output_dir_lock(output_dir, enabled=True):
    """Hold ``output_dir``'s lock for the block (``enabled``: the process that owns the run, rank 0)."""
    if not enabled or not output_dir:
        yield None
        return
    path = acquire(output_dir)
    try:
        yield path
    finally:
        release(path)

"""Build a dataset folder once, safely: under a file lock, in a temporary sibling folder that is
renamed into place only when complete (its stamp file written last). Several processes asking for
the same data at once (e.g. ``--num-gpus 2``) build it once; an interrupted build leaves no torn
folder; a changed stamp (new generator version or new inputs) rebuilds."""
import os
import shutil
import tempfile

from regionssl.utils.files import file_lock  # noqa: F401  (part of this module's interface)

__all__ = ["file_lock", "is_built", "build_once", "STAMP_FILE"]

STAMP_FILE = "VERSION"


def is_built(root, stamp):
    """True if ``root/VERSION`` holds exactly ``stamp`` (a complete build of these inputs)."""
    try:
        with open(os.path.join(root, STAMP_FILE)) as f:
            return f.read().strip() == stamp.strip()
    except OSError:
        return False


def build_once(root, stamp, build, force=False):
    """Make ``root`` a complete build stamped ``stamp``, unless it already is (and not ``force``).

    Args:
        root: the dataset folder.
        stamp: text identifying the build (generator version, inputs); written to ``root/VERSION``.
        build: ``build(folder)`` writes everything into the (temporary) ``folder``.
    Returns:
        bool: True if this call built the data, False if a complete build was already there.
    """
    root = os.path.abspath(root)
    if is_built(root, stamp) and not force:
        return False
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with file_lock(os.path.join(parent, "." + os.path.basename(root) + ".lock")):
        if is_built(root, stamp) and not force:  # another process finished while we waited
            return False
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(root) + ".tmp-", dir=parent)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data is meant to be shared
            build(tmp)
            with open(os.path.join(tmp, STAMP_FILE), "w") as f:
                f.write(stamp.strip() + "\n")
            if os.path.lexists(root):  # stale, partial or forced: move aside, then delete
                old = tempfile.mkdtemp(prefix="." + os.path.basename(root) + ".old-", dir=parent)
                os.replace(root, os.path.join(old, "x"))
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True

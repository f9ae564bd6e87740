"""Import a script of the repository (``train_net.py``, ``tools/*.py``, ``bench/*.py``) as a module.

The scripts are files, not a package: each runs as ``python tools/x.py`` and imports only installed
packages (``regionssl``, ``regionssl_workbench``). Tests and scripts that reuse another script's
functions load it by its path here, with no change to ``sys.path``.
"""
import importlib.util
import os
import sys

__all__ = ["REPO", "load_script"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (an editable install)


def load_script(path, name=None):
    """The module of the script at ``path`` (absolute, or relative to the repository), loaded once.

    It is registered in ``sys.modules`` under ``name`` (default: the file's stem), so pickling its
    functions by reference and a second load give the same module.
    """
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == os.path.abspath(path):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise FileNotFoundError(f"No Python script at {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

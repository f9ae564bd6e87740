"""regionssl: region-level self-supervised pretraining for object detection, inside Detectron2.

Importing the package registers every pretraining meta-architecture, the fine-tuning heads the
published protocols need, the view generators, region samplers and the built-in image-only datasets
(test and demo data live outside the package, in regionssl_workbench).
"""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from . import data  # noqa: F401,E402  (registers view generators, samplers, datasets)
from . import modeling  # noqa: F401,E402  (registers meta-architectures and heads)
from .config import add_regionssl_config  # noqa: E402

__all__ = ["add_regionssl_config", "__version__"]

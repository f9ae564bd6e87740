"""regionssl: region-level self-supervised pretraining for object detection, inside Detectron2.

Importing the package registers every pretraining meta-architecture, the fine-tuning heads the
published protocols need, the view generators, region samplers and the built-in datasets.
"""
from . import data  # noqa: F401  (registers view generators, samplers, datasets)
from . import modeling  # noqa: F401  (registers meta-architectures and heads)
from .config import add_regionssl_config

__all__ = ["add_regionssl_config"]
__version__ = "0.1.0"

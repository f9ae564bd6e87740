from . import regions, views  # noqa: F401  (registers view generators and region samplers)
from .build import build_pretrain_train_loader, get_pretrain_dataset_dicts
from .datasets import register_builtin_image_datasets
from .mapper import RegionSSLDatasetMapper
from .minidet import register_minidet
from .photo_pool import register_photo_pool
from .tiny import register_all as _register_tiny_and_demo

register_builtin_image_datasets()
_register_tiny_and_demo()
register_photo_pool()
register_minidet()
from . import saliency  # noqa: F401  (registers SaliencySwap and the saliency sources)

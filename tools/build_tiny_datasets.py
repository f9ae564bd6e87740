#!/usr/bin/env python
"""Build the tiny synthetic COCO / VOC sets (test and demo data; ``regionssl_workbench.tiny_datasets``).

    python tools/build_tiny_datasets.py                 # into the default root
    python tools/build_tiny_datasets.py --root /data/regionssl_tiny --force
"""
from regionssl_workbench.tiny_datasets import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Build the tiny synthetic COCO and VOC sets used by tests, quick schedules and demos.

    python tools/build_tiny_datasets.py                 # into the default root (see below)
    python tools/build_tiny_datasets.py --root /data/regionssl_tiny --force

Default root: $REGIONSSL_DATASETS, else $DETECTRON2_DATASETS/regionssl_tiny, else
<repo>/datasets/regionssl_tiny. Training does not need this step (datasets build on first use);
it is for inspecting the data or preparing a shared, read-only copy.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from regionssl.data.tiny import default_root, demo_image_files, ensure_tiny_datasets  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="output folder (default: {})".format(default_root()))
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)

    root = ensure_tiny_datasets(args.root, force=args.force)
    print("tiny COCO (regionssl_tiny_coco_{train,val}):")
    for split in ("train", "val"):
        print("  {:5s} json   {}".format(split, os.path.join(root, "coco", "annotations", "instances_%s.json" % split)))
        print("  {:5s} images {}".format(split, os.path.join(root, "coco", split)))
    print("tiny VOC (regionssl_tiny_voc_{trainval,test}):")
    print("  dirname      {}".format(os.path.join(root, "VOC2007")))
    print("demo photos (regionssl_demo_images, read in place):")
    for path in demo_image_files():
        print("  " + path)
    return root


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Write pictures of what the pretraining mapper makes: views side by side, matched regions in the
same colour in every view (``regionssl.data.visualize.draw_sample``).

    python tools/visualize_views.py --config-file configs/insloc_fpn.yaml --num 8 --output vis/insloc
    python tools/visualize_views.py --config-file configs/mocov2.yaml --num 4 --output vis/resim \
        INPUT.REGIONSSL.VIEW_GENERATOR TwoCropsSharedFlip INPUT.REGIONSSL.REGION_SAMPLER SlidingWindows

The images come from the config's ``DATASETS.TRAIN`` (override it, e.g.
``DATASETS.TRAIN "('regionssl_demo_images',)"``). ``--no-photometric`` shows the geometry only.
Trailing ``KEY VALUE`` pairs override the config.
"""
import argparse
import os
import random

import numpy as np
from PIL import Image

import regionssl  # noqa: F401  (registers datasets and samplers)
from regionssl.data import RegionSSLDatasetMapper, get_pretrain_dataset_dicts
from regionssl.engine import get_regionssl_cfg
from regionssl.data.visualize import draw_sample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num", type=int, default=8, help="number of pictures")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-photometric", action="store_true", help="turn colour jitter/blur/... off")
    parser.add_argument("--max-regions", type=int, default=12, help="draw at most this many regions per sample")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    opts = list(args.opts) + (["INPUT.REGIONSSL.PHOTOMETRIC.ENABLED", "False"] if args.no_photometric else [])
    cfg = get_regionssl_cfg(args.config_file, opts)
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    random.seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    written, tries = [], 0
    while len(written) < args.num and tries < 10 * args.num:
        d = dicts[tries % len(dicts)]
        tries += 1
        out = mapper(d)
        if out is None:  # unreadable image or no valid region: the mapper has warned
            continue
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = os.path.join(args.output, f"{len(written):03d}_{name}.png")
        Image.fromarray(draw_sample(out, max_regions=args.max_regions)).save(path)
        written.append(path)
    print(f"Wrote {len(written)} pictures to {args.output} "
          f"({cfg.INPUT.REGIONSSL.VIEW_GENERATOR} + {cfg.INPUT.REGIONSSL.REGION_SAMPLER})")
    return written


if __name__ == "__main__":
    main()

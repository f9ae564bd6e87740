#!/usr/bin/env python
"""``train_net.py`` with the tiny synthetic COCO / VOC sets registered (tools/build_tiny_datasets.py).

The fine-tuning quick schedules and the demo (``make demo``) train and evaluate on
``regionssl_tiny_coco_*`` / ``regionssl_tiny_voc_*``, which are test data, not datasets of the
``regionssl`` package; this entry point registers them (built on first use) and is otherwise
``train_net.py``, with every flag:

    python tools/train_net_tiny.py --config-file configs/quick_schedules/finetune_coco_mask_rcnn_R_50_FPN_demo.yaml \
        MODEL.WEIGHTS output/demo/pretrain/model_final.pth
"""
import os

from detectron2.engine import default_argument_parser, launch

from regionssl_workbench.scripts import load_script
from regionssl_workbench.tiny_datasets import register_tiny_datasets

train_net = load_script(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_net.py"))

register_tiny_datasets()  # at import: processes started by `launch` (--num-gpus N) import this module too


def main(args):
    return train_net.main(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

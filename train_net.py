#!/usr/bin/env python
"""One entry point for regionssl pretraining and for Detectron2 fine-tuning.

A config whose MODEL.META_ARCHITECTURE is a regionssl pretraining model (InsLoc, ReSim, SCRL,
SwAV, CVSA, MoCoV2, BYOL) trains it on images only; any other config fine-tunes and evaluates a
detector (COCO or VOC evaluator from the dataset's metadata).

    python train_net.py --config-file configs/insloc_fpn.yaml --num-gpus 8
    python train_net.py --config-file configs/finetune/coco_mask_rcnn_R_50_FPN_1x.yaml \
        --num-gpus 8 MODEL.WEIGHTS output/insloc_fpn/model_final.pth

On a machine without GPUs, ``--num-gpus N`` runs N CPU processes (gloo). One run at a time per
``OUTPUT_DIR``: the main process holds ``OUTPUT_DIR/run.lock`` (regionssl/engine/run_lock.py).
"""
import logging

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import regionssl  # noqa: F401  (registers models, heads and datasets)
from regionssl.engine import adapt_to_machine, check_weights_path, get_regionssl_cfg, is_pretraining, trainer_for
from regionssl.config_check import check_config
from regionssl.engine.run_lock import output_dir_lock


def load_config(args):
    cfg = get_regionssl_cfg(args.config_file, args.opts)
    adapt_to_machine(cfg)
    check_config(cfg, pretraining=False)  # ranges now; the memory of the crops once the trainer knows the processes
    if not args.resume or args.eval_only:
        check_weights_path(cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


def setup(cfg, args):
    """Detectron2's default_setup (config.yaml, log file, seed) and regionssl's logger."""
    default_setup(cfg, args)
    # default_setup configures only the detectron2/fvcore loggers; ours report checkpoint loading
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="regionssl")


def main(args):
    cfg = load_config(args)
    # the lock before default_setup, which writes config.yaml and the log into OUTPUT_DIR
    with output_dir_lock(cfg.OUTPUT_DIR, enabled=comm.is_main_process()):
        setup(cfg, args)
        return run(cfg, args)


def run(cfg, args):
    Trainer = trainer_for(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if is_pretraining(cfg):
            from regionssl.probe import run_probe

            result = run_probe(model, cfg)
            logging.getLogger("regionssl").info(f"Retrieval probe: {result}")
            return result
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )

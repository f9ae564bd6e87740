"""Cost of a fine-tuning protocol on this machine: seconds per training iteration and per evaluated
image, to size a transfer benchmark (models x seeds runs of ``tools/transfer.py``).

Training: the protocol's own trainer (``FinetuneTrainer``: real data loader, model, optimizer), from
random initialisation, ``--iters`` steps after one warm-up step. Evaluation: the model after those
steps, in eval mode, on the first ``--images`` images of the protocol's test set through its test
mapper (what ``COCOEvaluator`` runs, without the scoring). Process CPU time is reported beside wall
time: with ``--threads 1`` it is the least sensitive to other jobs on a shared machine, and the
2-thread wall time on an idle machine lies between CPU/2 and CPU. Each line is one ``--rounds``
repetition, so a noisy phase shows.

    python bench/finetune_cost.py --config-file configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml \
        --threads 1 2 --rounds 2
"""
import argparse
import os
import statistics
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import regionssl  # noqa: F401
import detectron2.utils.events as events
from regionssl_workbench.tiny_datasets import register_tiny_datasets
from detectron2.data import build_detection_test_loader
from regionssl.engine import FinetuneTrainer, adapt_to_machine, get_regionssl_cfg

register_tiny_datasets()  # test data outside the package: `make bench`'s short run uses the tiny COCO set


def _clock():
    return time.perf_counter(), time.process_time()


def measure(cfg, iters, images):
    """(train wall s/it, train CPU s/it, eval wall s/image, eval CPU s/image)."""
    torch.manual_seed(0)
    trainer = FinetuneTrainer(cfg)
    trainer.resume_or_load(resume=False)
    wall, cpu = [], []
    with events.EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(iters + 1):
            trainer.iter = storage.iter = i
            w, c = _clock()
            trainer.run_step()
            if i:  # the first step builds caches and workers
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
    model = trainer.model
    model.eval()
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    ewall, ecpu = [], []
    with torch.no_grad():
        for k, batch in enumerate(loader):
            if k > images:
                break
            w, c = _clock()
            model(batch)
            if k:
                ewall.append(time.perf_counter() - w)
                ecpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), statistics.median(ewall), statistics.median(ecpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed training steps per round")
    p.add_argument("--images", type=int, default=10, help="timed evaluation images per round")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE")
    args = p.parse_args(argv)
    cfg = get_regionssl_cfg(args.config_file, args.opts + ["OUTPUT_DIR", "/tmp/regionssl_finetune_cost",
                                                           "DATALOADER.NUM_WORKERS", "0"])
    adapt_to_machine(cfg, world_size=1)
    cfg.freeze()
    s = cfg.SOLVER
    print(f"{args.config_file}: batch {s.IMS_PER_BATCH}, train sizes {cfg.INPUT.MIN_SIZE_TRAIN} (max "
          f"{cfg.INPUT.MAX_SIZE_TRAIN}), test {cfg.INPUT.MIN_SIZE_TEST}, MAX_ITER {s.MAX_ITER}; load "
          f"{os.getloadavg()[0]:.1f}")
    print("| round | threads | train wall s/it | train CPU s/it | eval wall s/image | eval CPU s/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            res = measure(cfg, args.iters, args.images)
            print(f"| {r} | {t} | " + " | ".join(f"{v:.2f}" for v in res) + " |", flush=True)


if __name__ == "__main__":
    main()

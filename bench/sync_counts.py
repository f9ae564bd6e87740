"""Host reads (GPU syncs) in one training step of every method, with 1 and 2 processes.

Every method's ``*_instant_test.yaml`` with a ResNet-18 trunk and 64 px views is built into a
``PretrainTrainer`` (the real DDP wrapper, optimizer, hooks and metric writing); its first two
steps, on 2 and on 3 images per process, are counted with
:class:`regionssl_workbench.host_reads.HostReadCounter` (what counts as a read, and how the CPU run
tells host from device tensors, is in its docstring). Loading the batch is not counted. SwAV's
prototypes are frozen in the first step only, and its queue is used (full) in the second.

    python bench/sync_counts.py                  # prints the table, 1 and 2 processes
    python bench/sync_counts.py --where          # also where each read happens
    python bench/sync_counts.py --out output/bench/sync_counts.md --label after

``tests/engine/test_gpu_readiness.py`` imports this file and asserts the budget.
"""
import argparse
import hashlib
import json
import logging
import os
import random
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import regionssl  # noqa: F401
from detectron2.engine import launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.engine import PretrainTrainer, adapt_to_machine, get_regionssl_cfg
from regionssl_workbench.host_reads import count_trainer_step
from regionssl_workbench.recipes import instant_test, recipes

R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
SMALL = ["MODEL.DEVICE", "cpu", "INPUT.REGIONSSL.CROP_SIZE", 64, "SOLVER.MAX_ITER", 1000,
         "SOLVER.CHECKPOINT_PERIOD", 100000, "VIS_PERIOD", 0, "TEST.REGIONSSL.PROBE_PERIOD", 0]
# narrow heads: the reads do not depend on widths, the run time does
HEADS = ["MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM", 64, "MODEL.REGIONSSL.PREDICTOR.HIDDEN_DIM", 64]
FPN = ["MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, "MODEL.ROI_BOX_HEAD.FC_DIM", 128]
# queue written from the first step and full (used) from the second
SWAV = ["INPUT.REGIONSSL.MULTI_CROP.SIZES", [64, 32], "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER", 0,
        "MODEL.REGIONSSL.SWAV.QUEUE_LENGTH", 2]
# recipe -> options beyond HEADS that fit its views and regions to the 64 px crops (every recipe of
# regionssl_workbench.recipes runs, from its instant-test config)
SMALLER = {
    "insloc_c4": ["INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60]],
    "insloc_fpn": FPN + ["INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60]],
    "resim_c4": ["INPUT.REGIONSSL.WINDOWS.SIZES", [24], "INPUT.REGIONSSL.WINDOWS.STRIDES", [16]],
    "resim_fpn": FPN,
    "scrl": ["INPUT.REGIONSSL.INTERSECTION.MIN_SIZE", 16],
    "swav": SWAV,
    "swav_region": SWAV,
}
SIZES = (2, 3)  # images per process of the two counted steps


def method_cfg(name, out_dir, world_size=1):
    opts = R18 + SMALL + HEADS + SMALLER.get(name, []) + ["SOLVER.IMS_PER_BATCH", max(SIZES) * world_size, "OUTPUT_DIR", out_dir]
    return adapt_to_machine(get_regionssl_cfg(instant_test(name), opts), world_size)


def mapped_batches(cfg, sizes, seed):
    """One list of mapper outputs per entry of ``sizes`` (demo photos, seeded)."""
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    out, i = [], 0
    for n in sizes:
        batch = []
        while len(batch) < n:
            m = mapper(dicts[i % len(dicts)])
            i += 1
            if m is not None:
                batch.append(m)
        out.append(batch)
    return out


def state_digest(model):
    """{state_dict key: sha1 of its bytes} (the tests compare it across ranks at step 0)."""
    module = getattr(model, "module", model)
    return {k: hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def measure(name, out_dir):
    """Method ``name`` in this process group: {"counts": [(size, total, where)] of the counted
    steps, "state": :func:`state_digest` of the trainer's model before the first step}."""
    for handler in setup_logger().handlers:  # the trainer's model printout and info lines
        handler.setLevel(logging.WARNING)
    cfg = method_cfg(name, out_dir, comm.get_world_size())
    torch.manual_seed(comm.get_rank())  # ranks build different initial weights, as with SEED -1
    trainer = PretrainTrainer(cfg)
    state = state_digest(trainer.model)
    batches = mapped_batches(cfg, SIZES, seed=17 + comm.get_rank())
    counts = []
    with EventStorage(0) as trainer.storage:
        trainer.iter = trainer.start_iter = 0
        trainer.before_train()
        for size, batch in zip(SIZES, batches):
            counter = count_trainer_step(trainer, batch)
            counts.append((size, counter.total, dict(counter.where)))
    return {"counts": counts, "state": state}


def _worker(names, out_dir):
    res = {name: measure(name, os.path.join(out_dir, name)) for name in names}
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(res, f)


def run(names, processes):
    """Per rank, {name: :func:`measure`'s result}, with ``processes`` gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        if processes == 1:
            return [{name: measure(name, os.path.join(tmp, name)) for name in names}]
        launch(_worker, processes, dist_url=f"tcp://127.0.0.1:{_find_free_port()}", args=(list(names), tmp))
        out = []
        for rank in range(processes):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=recipes(), help="recipes (default: all)")
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--where", action="store_true", help="print where the reads happen")
    parser.add_argument("--out", help="append a markdown table to this file")
    parser.add_argument("--label", default="", help="heading of the appended table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = {p: run(args.methods, p)[0] for p in args.processes}  # rank 0
    sizes = " | ".join(f"{p} proc, {s} img" for p in args.processes for s in SIZES)
    lines = [f"| method | {sizes} |", "|---|" + "---|" * (len(args.processes) * len(SIZES))]
    for name in args.methods:
        counts = [str(total) for p in args.processes for _, total, _ in table[p][name]["counts"]]
        lines.append(f"| {name} | " + " | ".join(counts) + " |")
    print("\n".join(lines))
    if args.where:
        for p in args.processes:
            for name in args.methods:
                for size, total, where in table[p][name]["counts"]:
                    print(f"\n{name}, {p} process(es), {size} images/process: {total} reads")
                    for loc, n in sorted(where.items(), key=lambda kv: -kv[1]):
                        print(f"  {n:4d}  {loc}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### {args.label}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

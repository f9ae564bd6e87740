#!/usr/bin/env python
r"""Submit any train_net.py run to Slurm through submitit (``pip install submitit``).

    python tools/slurm_launch.py --config-file configs/insloc_fpn.yaml --nodes 4 --gpus-per-node 8 \
        --partition learnfair --timeout 4320 OUTPUT_DIR output/insloc_fpn
    python tools/slurm_launch.py --config-file configs/finetune/coco_mask_rcnn_R_50_FPN_1x.yaml \
        --nodes 1 --gpus-per-node 8 MODEL.WEIGHTS output/insloc_fpn/model_final.pth OUTPUT_DIR output/ft

One task per GPU; each computes ``--dist-url`` (first node) and ``--machine-rank`` from the job
environment. On preemption or at the time limit the job requeues itself with ``--resume`` and
continues from the last checkpoint in OUTPUT_DIR (up to ``--max-requeues`` times). Batch size and
learning rate follow ``SOLVER.REFERENCE_WORLD_SIZE`` for nodes x GPUs processes. Submission
files and logs go to ``--job-dir`` (default OUTPUT_DIR/slurm). ``--cluster local`` runs the job on
this machine through submitit's local executor (same code path, for a dry run).
``--num-gpus``, ``--num-machines``, ``--machine-rank`` and ``--dist-url`` are set by the job itself.
"""
import os

from detectron2.engine import default_argument_parser

from regionssl.engine import get_regionssl_cfg
from regionssl.engine.slurm import TrainJob, make_executor
from regionssl_workbench.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
train_net = load_script(os.path.join(ROOT, "train_net.py"))  # this clone's entry point, as users edit it


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    slurm = parser.add_argument_group("slurm (submitit)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= training processes) per node")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--timeout", type=int, default=72 * 60, help="minutes per job (it requeues itself after)")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per GPU (data loading)")
    slurm.add_argument("--mem-gb", type=int, default=0, help="memory per node (0 = the partition default)")
    slurm.add_argument("--constraint", default="")
    slurm.add_argument("--comment", default="")
    slurm.add_argument("--job-name", default="regionssl")
    slurm.add_argument("--job-dir", default="", help="submitit folder (default: OUTPUT_DIR/slurm)")
    slurm.add_argument("--max-requeues", type=int, default=30)
    slurm.add_argument("--port", type=int, default=0, help="rendezvous port (default: from the job id)")
    slurm.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                       help="submitit executor (default: Slurm if available)")
    return parser.parse_args(argv)


def submit(args, main=None):
    """Submit ``main`` (default: train_net.main) for ``args``; returns the submitit job."""
    import cloudpickle

    cfg = get_regionssl_cfg(args.config_file, args.opts)  # a bad config fails here, not in the queue
    job_dir = args.job_dir or os.path.join(cfg.OUTPUT_DIR, "slurm")
    # the job unpickles train_net.main by value: it needs no import path to this folder
    cloudpickle.register_pickle_by_value(train_net)
    executor = make_executor(
        job_dir, args.nodes, args.gpus_per_node, args.timeout, cluster=args.cluster, partition=args.partition,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, constraint=args.constraint, comment=args.comment,
        name=args.job_name, max_requeues=args.max_requeues,
    )
    job = executor.submit(TrainJob(main or train_net.main, args, args.port))
    print(f"Submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), "
          f"output {cfg.OUTPUT_DIR}, logs {job_dir}")
    return job


if __name__ == "__main__":
    submit(parse_args())

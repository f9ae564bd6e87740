"""Slurm jobs through submitit (optional dependency): N nodes x G GPUs, requeued and resumed.

:class:`TrainJob` is what submitit runs: one task per GPU (``tasks_per_node = G``). Each task
reads submitit's ``JobEnvironment`` and plays the part of one worker of Detectron2's ``launch``:
``--num-machines`` = nodes, ``--machine-rank`` = its node, ``--dist-url`` =
``tcp://<first node>:<port>`` (port from the job id, identical on every task), local rank = its
rank on the node; it then runs Detectron2's own ``_distributed_worker`` (process group, local
group, device) and the training ``main``.

Preemption or time limit: Slurm sends ``USR2`` (``--signal``, submitit's ``slurm_signal_delay_s``);
submitit calls :meth:`TrainJob.checkpoint` on rank 0, which resubmits the same job with
``--resume`` and requeues it. The requeued job continues from ``last_checkpoint`` of
``OUTPUT_DIR`` (Detectron2's ``resume_or_load``: model, optimizer, scheduler, iteration, and for
pretraining the data stream and random state, see :mod:`regionssl.engine.resume`). Work since
the last periodic checkpoint (``SOLVER.CHECKPOINT_PERIOD``) is redone.
"""
import copy
import logging
import re

__all__ = ["TrainJob", "dist_url_for", "make_executor"]

logger = logging.getLogger(__name__)


def dist_url_for(env, port=0):
    """``tcp://<first node of the job>:<port>``; port 0: 20000 + (job id mod 20000), the same on every task."""
    if not port:
        digits = re.sub(r"\D", "", str(env.job_id)) or "0"
        port = 20000 + int(digits) % 20000
    return f"tcp://{env.hostnames[0]}:{port}"


class TrainJob:
    """A submitit-checkpointable training run: ``main(args)`` on every task of the job.

    Args:
        main: the training entry point (``train_net.main``), called with Detectron2-style ``args``.
        args: ``argparse.Namespace`` of ``default_argument_parser``; ``num_gpus``,
            ``num_machines``, ``machine_rank`` and ``dist_url`` are set from the job environment.
        port: rendezvous port (0 = derived from the job id).
    """

    def __init__(self, main, args, port=0):
        self.main, self.args, self.port = main, args, port

    def distributed_args(self, env):
        args = copy.copy(self.args)
        args.num_machines = env.num_nodes
        args.num_gpus = env.num_tasks // env.num_nodes
        args.machine_rank = env.node
        args.dist_url = dist_url_for(env, self.port)
        return args

    def __call__(self):
        import submitit
        from detectron2.engine.launch import _distributed_worker

        env = submitit.JobEnvironment()
        args = self.distributed_args(env)
        logger.info(f"{env}: machine rank {args.machine_rank}/{args.num_machines}, {args.num_gpus} GPUs per node, "
                    f"dist-url {args.dist_url}, resume {args.resume}")
        if env.num_tasks == 1:
            return self.main(args)
        # one Detectron2 launch worker per task: process group over all tasks, local group per node
        return _distributed_worker(env.local_rank, self.main, env.num_tasks, args.num_gpus, args.machine_rank,
                                   args.dist_url, (args,))

    def checkpoint(self, *unused):
        """Called by submitit on preemption/timeout: the same job again, resuming from last_checkpoint."""
        import submitit

        args = copy.copy(self.args)
        args.resume = True
        logger.warning("Preempted or out of time: requeueing with --resume (continues from the last checkpoint).")
        return submitit.helpers.DelayedSubmission(type(self)(self.main, args, self.port))


def make_executor(folder, nodes, gpus_per_node, timeout_min, cluster=None, partition="", cpus_per_task=8,
                  mem_gb=0, constraint="", comment="", name="regionssl", max_requeues=30, signal_delay_s=120):
    """A submitit executor for N nodes x G tasks (one per GPU); ``cluster`` "local"/"debug" for tests."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
    params = dict(name=name, nodes=nodes, tasks_per_node=gpus_per_node, gpus_per_node=gpus_per_node,
                  cpus_per_task=cpus_per_task, timeout_min=timeout_min, slurm_signal_delay_s=signal_delay_s)
    if mem_gb:
        params["mem_gb"] = mem_gb
    for key, value in (("slurm_partition", partition), ("slurm_constraint", constraint), ("slurm_comment", comment)):
        if value:
            params[key] = value
    executor.update_parameters(**params)
    return executor

"""Trainers: DefaultTrainer subclasses for pretraining and for detection fine-tuning.

They change Detectron2's trainer through its builders only (``build_*`` class methods). Three
pieces ``DefaultTrainer.__init__`` hard-codes are builders here, which is all its copy below adds:

* ``build_ddp_model``: Detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which
  DistributedDataParallel rejects for a CPU model (``--num-gpus N`` on a CPU machine would crash);
  here CPU models get none, rank 0's buffers are broadcast once (every process starts from the same
  queues and BN statistics) and ``find_unused_parameters`` is on only for a model that asks for it;
* ``build_step_runner``: ``SimpleTrainer``/``AMPTrainer``, for pretraining reading a step's losses
  and diagnostics from the device with one copy (:class:`OneReadStep`), and their accumulating
  versions for ``SOLVER.REGIONSSL.ACCUMULATE``;
* ``build_checkpointer``: the regionssl checkpointer (pretraining checkpoints carry a format tag;
  safe reads, atomic writes, resume falling back to the previous readable checkpoint).

Both trainers add two hooks to Detectron2's: :class:`~regionssl.engine.weights_guard.WeightsGuard`
just before the checkpointer (diverged weights are never saved) and
:class:`~regionssl.engine.resume_checks.SolverKeysOnResume` (solver keys changed on resume are
refused or reported). ``resume_or_load`` also writes a missing ``model_final.pth`` when the run
resumes from a checkpoint of its last iteration. Everything else (hooks, writers with ETA,
checkpointing, resume) is Detectron2's.
"""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.logger import setup_logger

from ..checkpoint import FormatTag, RegionSSLCheckpointer, input_format_of
from ..config_check import check_config
from ..data.build import build_pretrain_train_loader
from ..modeling.meta_arch.base import RegionSSLBase
from ..utils.distributed import broadcast_buffers_from_rank0
from .hooks import ModelStepHook, PretrainLoader, build_pretrain_hooks
from .resume import DataStateHook
from .resume_checks import SolverKeysOnResume
from .weights_guard import WeightsGuard
from . import accumulate, setup

__all__ = ["PretrainTrainer", "FinetuneTrainer", "trainer_for", "is_pretraining", "wrap_ddp", "OneReadStep"]


def is_pretraining(cfg):
    """True if ``MODEL.META_ARCHITECTURE`` names a regionssl pretraining model."""
    name = cfg.MODEL.META_ARCHITECTURE
    return name in META_ARCH_REGISTRY and issubclass(META_ARCH_REGISTRY.get(name), RegionSSLBase)


def trainer_for(cfg):
    return PretrainTrainer if is_pretraining(cfg) else FinetuneTrainer


def wrap_ddp(model, find_unused_parameters=False):
    """``create_ddp_model`` that also works for CPU models (gloo): no device_ids there.

    DDP broadcasts rank 0's parameters at construction but, with ``broadcast_buffers=False`` (per-
    process BN statistics, as MoCo's shuffle-BN needs), no buffers: they are broadcast here once, so
    queues drawn at random and every other buffer start equal on every rank whatever the seeds.
    """
    broadcast_buffers_from_rank0(model)
    device_ids = None if next(model.parameters()).device.type == "cpu" else [comm.get_local_rank()]
    return create_ddp_model(
        model, broadcast_buffers=False, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


class OneReadStep:
    """Mixin for Detectron2's ``SimpleTrainer``/``AMPTrainer`` driving a :class:`RegionSSLBase`.

    Detectron2 reads every loss with its own ``.cpu()`` and the model would read each logged
    diagnostic: one GPU sync each. Here the model keeps its diagnostics on the device
    (``defer_log_flush``) and they are read together with the losses, with one copy, after the
    backward pass has been queued.
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        getattr(model, "module", model).defer_log_flush = True

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        iter = self.iter if iter is None else iter
        names = list(loss_dict) if (iter + 1) % self.gather_metric_period == 0 else []
        values = getattr(self.model, "module", self.model).flush_logs(extra=[loss_dict[k] for k in names])
        if names:  # host tensors now: Detectron2's .cpu().item() reads nothing more from the device
            super()._write_metrics({k: torch.tensor(v) for k, v in zip(names, values)}, data_time, prefix, iter)


class _OneReadSimpleTrainer(OneReadStep, SimpleTrainer):
    pass


class _OneReadAMPTrainer(OneReadStep, AMPTrainer):
    pass


class CheckpointAlignedWriter(hooks.PeriodicWriter):
    """Detectron2's PeriodicWriter that also writes ``metrics.json`` (and the other file writers, not
    the console) at the end of every iteration the checkpointer saves: what is on disk is never
    behind the last checkpoint, so a run killed later still leaves its metrics up to there."""

    def __init__(self, writers, period, checkpoint_period):
        super().__init__(writers, period)
        self._checkpoint_period = checkpoint_period

    def after_step(self):
        super().after_step()
        it = self.trainer.iter
        if (it + 1) % self._checkpoint_period == 0 and (it + 1) % self._period != 0 and it != self.trainer.max_iter - 1:
            for writer in self._writers:
                if not isinstance(writer, CommonMetricPrinter):
                    writer.write()


class _Trainer(DefaultTrainer):
    # True/False for DistributedDataParallel's find_unused_parameters; None asks the model
    # (``RegionSSLBase.needs_find_unused_parameters``).
    find_unused_parameters = False
    step_trainers = (SimpleTrainer, AMPTrainer)  # (fp32, AMP)

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with the DDP wrapping, the step runner and the checkpointer built by
        # the builders below (Detectron2 hard-codes them; its create_ddp_model fails for CPU models).
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_config(cfg, pretraining=is_pretraining(cfg), world_size=comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.build_ddp_model(cfg, model)
        self._trainer = self.build_step_runner(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @property
    def step_runner(self):
        """The SimpleTrainer/AMPTrainer (or accumulating twin) that runs each iteration."""
        return self._trainer

    @staticmethod
    def auto_scale_workers(cfg, num_workers):
        """Detectron2's REFERENCE_WORLD_SIZE scaling (+ regionssl's keys, :func:`setup.auto_scale_workers`);
        a process running k accumulated micro-batches counts as k."""
        return setup.auto_scale_workers(cfg, num_workers * cfg.SOLVER.REGIONSSL.ACCUMULATE)

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """DistributedDataParallel (several processes) with CPU models supported (:func:`wrap_ddp`)."""
        find_unused = cls.find_unused_parameters
        if find_unused is None:
            find_unused = model.needs_find_unused_parameters()
        return wrap_ddp(model, find_unused)

    @classmethod
    def build_step_runner(cls, cfg, model, data_loader, optimizer):
        """``step_trainers`` (fp32, AMP), or their accumulating versions for SOLVER.REGIONSSL.ACCUMULATE > 1."""
        return accumulate.build_step_runner(cfg, model, data_loader, optimizer, cls.step_trainers)

    @classmethod
    def build_checkpointer(cls, cfg, model, **checkpointables):
        return RegionSSLCheckpointer(model, cfg.OUTPUT_DIR, input_format=input_format_of(cfg), **checkpointables)

    def build_hooks(self):
        """Detectron2's hooks, with :class:`WeightsGuard` right before the checkpointer,
        :class:`SolverKeysOnResume` (its state travels in every checkpoint) and the writers also
        writing at checkpoints (:class:`CheckpointAlignedWriter`)."""
        ret = [CheckpointAlignedWriter(h._writers, h._period, self.cfg.SOLVER.CHECKPOINT_PERIOD)
               if type(h) is hooks.PeriodicWriter else h for h in super().build_hooks()]
        guard = self.cfg.TEST.REGIONSSL.WEIGHTS_GUARD
        if guard.ENABLED:
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)), len(ret))
            ret.insert(at, WeightsGuard(self.cfg.SOLVER.CHECKPOINT_PERIOD, guard.MAX_NORM_GROWTH))
        return ret + [SolverKeysOnResume(self.cfg)]

    def resume_or_load(self, resume=True):
        """Detectron2's, with the regionssl checkpointer's fallback (``start_iter`` follows the
        checkpoint actually loaded). A run resumed from a checkpoint of its last iteration whose
        ``model_final.pth`` is missing or unreadable is not finished: the final checkpoint is written
        now, from that state (the state after the last iteration, as the run would have saved it)."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        resumed = self.checkpointer.resumed_from
        if not resumed:
            return
        self.start_iter = self.iter + 1
        if self.start_iter >= self.max_iter and os.path.basename(resumed) != "model_final.pth":
            logging.getLogger(__name__).warning(
                f"{resumed} holds the state after the last iteration ({self.iter}) but model_final.pth is missing or "
                "unreadable: writing it now.")
            self.checkpointer.save("model_final", iteration=self.iter)

    @classmethod
    def build_train_loader(cls, cfg):
        return super().build_train_loader(accumulate.micro_batch_cfg(cfg))  # IMS_PER_BATCH / ACCUMULATE per call

    def build_writers(self):
        """Detectron2's console/JSON/TensorBoard writers, plus W&B / MLflow when enabled."""
        from .tracking import build_tracking_writers

        return super().build_writers() + build_tracking_writers(self.cfg)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # With RESCALE_INTERVAL the cosine runs over MAX_ITER - WARMUP_ITERS; fvcore would divide
        # by zero (or a negative length) deep in the first scheduler step.
        s = cfg.SOLVER
        if s.RESCALE_INTERVAL and s.WARMUP_ITERS >= s.MAX_ITER:
            raise ValueError(
                f"SOLVER.WARMUP_ITERS ({s.WARMUP_ITERS}) must be smaller than SOLVER.MAX_ITER ({s.MAX_ITER}) "
                "when SOLVER.RESCALE_INTERVAL is True (the schedule after warmup would be empty); "
                "lower WARMUP_ITERS along with MAX_ITER."
            )
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_optimizer(cls, cfg, model):
        name = cfg.SOLVER.REGIONSSL.OPTIMIZER
        if name == "SGD":
            return d2_build_optimizer(cfg, model)
        if name == "LARS":
            from ..solver import LARS, build_lars_param_groups

            s = cfg.SOLVER.REGIONSSL
            groups = build_lars_param_groups(
                model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, s.LARS_EXCLUDE_BIAS_AND_NORM,
                exclude_names=s.LARS_EXCLUDE_NAMES, grad_times_lr=s.LARS_EXCLUDED_GRAD_TIMES_LR,
            )
            opt = LARS(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, eta=cfg.SOLVER.REGIONSSL.LARS_TRUST)
            return maybe_add_gradient_clipping(cfg, opt)
        raise ValueError(f"SOLVER.REGIONSSL.OPTIMIZER must be 'SGD' or 'LARS', not {name!r}")


class PretrainTrainer(_Trainer):
    """Self-supervised pretraining: image-only loader, no evaluator, regionssl hooks."""

    find_unused_parameters = None  # the model says (SwAV while its prototypes are frozen)
    step_trainers = (_OneReadSimpleTrainer, _OneReadAMPTrainer)

    @classmethod
    def build_checkpointer(cls, cfg, model, **checkpointables):
        tag = FormatTag(cfg.MODEL.META_ARCHITECTURE, input_format_of(cfg))
        return RegionSSLCheckpointer(model, cfg.OUTPUT_DIR, regionssl=tag, input_format=input_format_of(cfg),
                                     **checkpointables)

    @classmethod
    def build_train_loader(cls, cfg):
        """The image-only loader, wrapped for the hooks (skipped files, pictures, exact resume)."""
        loader = build_pretrain_train_loader(accumulate.micro_batch_cfg(cfg))
        return PretrainLoader(loader, keep_last_batch=cfg.VIS_PERIOD > 0)

    def build_hooks(self):
        ret = [h for h in super().build_hooks() if not isinstance(h, (hooks.EvalHook, hooks.PreciseBN))]
        # writers must stay last so they see what the other hooks logged
        writers = [h for h in ret if isinstance(h, hooks.PeriodicWriter)]
        others = [h for h in ret if not isinstance(h, hooks.PeriodicWriter)]
        data_state = DataStateHook(self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())  # exact resume
        # ModelStepHook first: the iteration is set before anything else of the step, and the EMA
        # happens inside the step's timing and before the checkpointer saves
        return [ModelStepHook(), data_state] + others + build_pretrain_hooks(self.cfg, self) + writers

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Pretraining has no detection evaluation; the retrieval probe is a hook/command."""
        return OrderedDict()


class FinetuneTrainer(_Trainer):
    """Detection fine-tuning; the evaluator follows the dataset's ``evaluator_type``."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if kind == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        if kind == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(f"No evaluator for dataset {dataset_name!r} (evaluator_type={kind!r}); use a COCO or VOC dataset")

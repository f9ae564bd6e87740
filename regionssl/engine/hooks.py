"""Pretraining hooks and the loader they read.

* :class:`ModelStepHook` hands the step-dependent state to the model: the iteration before the
  step, the once-per-step updates (EMA of the target network) after the optimizer step;
* :class:`PretrainLoader` wraps the pretraining loader: it collects the unreadable files the mapper
  skipped, keeps the last batch for pictures and lets :class:`~regionssl.engine.resume.DataStateHook`
  act when the stream starts;
* :class:`SkippedFilesHook`, :class:`ViewPairVisualizer`, :class:`ProbeHook`: the count of skipped
  files, view-pair pictures in TensorBoard, the periodic retrieval probe.
"""
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.build import ResumableTrainingSampler

__all__ = [
    "ModelStepHook", "PretrainLoader", "ViewPairVisualizer", "ProbeHook", "SkippedFilesHook", "build_pretrain_hooks",
]


def _bare(model):
    """The model inside a DistributedDataParallel wrapper (``.module``), or the model itself."""
    return getattr(model, "module", model)


class ModelStepHook(HookBase):
    """Step-dependent state of a pretraining model, from the trainer (never read inside ``forward``).

    Before each step: ``model.before_step(trainer.iter)`` (the global iteration every schedule
    reads). After it, once the optimizer has stepped: ``model.after_step()`` (the EMA of the target
    network with that iteration's coefficient, as the official codes order it; SwAV re-normalises
    its prototypes at the start of a step). Register it before the checkpointer, so a checkpoint
    holds the target updated for its iteration, and before the iteration timer, so the step's time
    includes the EMA. With gradient accumulation both run once per optimizer step.
    """

    def before_step(self):
        _bare(self.trainer.model).before_step(self.trainer.iter)

    def after_step(self):
        _bare(self.trainer.model).after_step()


class PretrainLoader:
    """Iterable over the pretraining loader's batches, with what the pretraining hooks read.

    Attributes:
        files: the distinct unreadable files skipped so far by every loader worker of this process
            (each mapped dict carries the ``skipped_files`` its worker met since its previous output).
        last_batch: the batch yielded last (kept only with ``keep_last_batch``: pictures).
        sampler: the :class:`ResumableTrainingSampler` of the stream, or None.

    :meth:`at_start` registers a function that runs once the underlying loader's iterator exists
    (torch's DataLoader draws its workers' base seed from the global generator then) and before the
    first batch is made.
    """

    def __init__(self, loader, keep_last_batch=False):
        self.loader, self.keep_last_batch = loader, keep_last_batch
        self.files, self.last_batch, self._at_start = set(), None, []

    @property
    def sampler(self):
        sampler = getattr(getattr(self.loader, "dataset", None), "sampler", None)  # Detectron2's ToIterableDataset
        return sampler if isinstance(sampler, ResumableTrainingSampler) else None

    def at_start(self, fn):
        self._at_start.append(fn)

    def __iter__(self):
        batches = iter(self.loader)
        while self._at_start:
            self._at_start.pop(0)()
        for batch in batches:
            for d in batch:
                self.files.update(d.get("skipped_files", ()))
            if self.keep_last_batch:
                self.last_batch = batch
            yield batch

    def __len__(self):
        return len(self.loader)


class SkippedFilesHook(HookBase):
    """Puts ``regionssl/skipped_images`` (distinct unreadable files skipped so far by this process's
    loader workers) into the EventStorage every step; at the last step the count is over all
    processes. At the end it logs the count and writes the names to ``OUTPUT_DIR/skipped_images.txt``."""

    def __init__(self, output_dir):
        self._output_dir, self._files, self._final = output_dir, set(), False

    def after_step(self):
        loader = self.trainer.data_loader
        if not isinstance(loader, PretrainLoader):
            return
        self._files = set(loader.files)
        if self.trainer.iter == self.trainer.max_iter - 1:  # every rank is here: safe to gather
            if comm.get_world_size() > 1:
                self._files = set().union(*comm.all_gather(sorted(self._files)))
            self._final = True
        get_event_storage().put_scalar("regionssl/skipped_images", len(self._files), smoothing_hint=False)

    def after_train(self):
        if not comm.is_main_process():
            return
        logger = logging.getLogger(__name__)
        scope = "all processes" if self._final or comm.get_world_size() == 1 else "this process"
        if not self._files:
            logger.info(f"Skipped image files: 0 ({scope}).")
            return
        path = os.path.join(self._output_dir, "skipped_images.txt")
        os.makedirs(self._output_dir, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(name + "\n" for name in sorted(self._files))
        logger.warning(f"Skipped image files: {len(self._files)} unreadable ({scope}); names in {path}")


class ViewPairVisualizer(HookBase):
    """Every ``period`` iterations, put the views of one sample of the current batch, with matched
    regions drawn in the same colour in every view, into the EventStorage (TensorBoard image)."""

    def __init__(self, period):
        self._period = period

    def after_step(self):
        it = self.trainer.iter + 1
        if self._period <= 0 or it % self._period != 0 or not comm.is_main_process():
            return
        from ..utils.visualize import draw_sample

        batch = getattr(self.trainer.data_loader, "last_batch", None)
        if not batch:
            return
        picture = draw_sample(batch[0])  # (H, W, 3) uint8
        get_event_storage().put_image("regionssl/views", picture.transpose(2, 0, 1))


class ProbeHook(HookBase):
    """Every ``period`` iterations (and at the end), log the view-matching retrieval accuracy."""

    def __init__(self, cfg, period):
        self._cfg, self._period = cfg, period

    def _run(self):
        from ..probe import run_probe

        result = run_probe(_bare(self.trainer.model), self._cfg)
        if comm.is_main_process():
            storage = get_event_storage()
            for k, v in result.items():
                storage.put_scalar(f"probe/{k}", v, smoothing_hint=False)
            logging.getLogger(__name__).info(f"Retrieval probe at iter {self.trainer.iter + 1}: {result}")

    def after_step(self):
        it = self.trainer.iter + 1
        if it % self._period == 0 and it != self.trainer.max_iter:
            self._run()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._run()


def build_pretrain_hooks(cfg, trainer):
    hooks = [SkippedFilesHook(cfg.OUTPUT_DIR)]
    if cfg.VIS_PERIOD > 0:
        hooks.append(ViewPairVisualizer(cfg.VIS_PERIOD))
    if cfg.TEST.REGIONSSL.PROBE_PERIOD > 0:
        hooks.append(ProbeHook(cfg, cfg.TEST.REGIONSSL.PROBE_PERIOD))
    return hooks

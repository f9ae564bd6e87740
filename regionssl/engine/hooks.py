"""Pretraining hooks: view-pair pictures in TensorBoard, the periodic retrieval probe and the
count of unreadable image files the loader skipped."""
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = [
    "ViewPairVisualizer", "ProbeHook", "build_pretrain_hooks", "RememberLastBatch", "CollectSkippedFiles",
    "SkippedFilesHook",
]


class RememberLastBatch:
    """Iterable wrapper of a data loader that keeps the batch it yielded last (for pictures)."""

    def __init__(self, loader):
        self.loader, self.last_batch = loader, None

    def __iter__(self):
        for batch in self.loader:
            self.last_batch = batch
            yield batch

    def __len__(self):
        return len(self.loader)


class CollectSkippedFiles:
    """Iterable wrapper of the pretraining loader that collects the ``skipped_files`` each mapped
    dict carries (the unreadable files its worker met since that worker's previous output), so
    ``files`` is the set of distinct skipped files over every loader worker of this process."""

    def __init__(self, loader):
        self.loader, self.files = loader, set()

    def __iter__(self):
        for batch in self.loader:
            for d in batch:
                self.files.update(d.get("skipped_files", ()))
            yield batch

    def __len__(self):
        return len(self.loader)


def _find_loader(loader, kind):
    """The ``kind`` wrapper among ``loader`` and the loaders it wraps (``.loader``), or None."""
    while loader is not None and not isinstance(loader, kind):
        loader = getattr(loader, "loader", None)
    return loader


class SkippedFilesHook(HookBase):
    """Puts ``regionssl/skipped_images`` (distinct unreadable files skipped so far by this process's
    loader workers) into the EventStorage every step; at the last step the count is over all
    processes. At the end it logs the count and writes the names to ``OUTPUT_DIR/skipped_images.txt``."""

    def __init__(self, output_dir):
        self._output_dir, self._files, self._final = output_dir, set(), False

    def after_step(self):
        collector = _find_loader(self.trainer._trainer.data_loader, CollectSkippedFiles)
        if collector is None:
            return
        self._files = set(collector.files)
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

        batch = getattr(self.trainer._trainer.data_loader, "last_batch", None)
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

        model = getattr(self.trainer.model, "module", self.trainer.model)
        result = run_probe(model, self._cfg)
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

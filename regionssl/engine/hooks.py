"""Pretraining hooks: view-pair pictures in TensorBoard and the periodic retrieval probe."""
import logging

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["ViewPairVisualizer", "ProbeHook", "build_pretrain_hooks", "RememberLastBatch"]


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
    hooks = []
    if cfg.VIS_PERIOD > 0:
        hooks.append(ViewPairVisualizer(cfg.VIS_PERIOD))
    if cfg.TEST.REGIONSSL.PROBE_PERIOD > 0:
        hooks.append(ProbeHook(cfg, cfg.TEST.REGIONSSL.PROBE_PERIOD))
    return hooks

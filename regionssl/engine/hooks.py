"""Pretraining hooks and the loader they read.

* :class:`ModelStepHook` hands the step-dependent state to the model: the iteration before the
  step, the once-per-step updates (EMA of the target network) after the optimizer step;
* :class:`PretrainLoader` wraps the pretraining loader: it collects the unreadable files the mapper
  skipped, keeps the last batch for pictures and lets :class:`~regionssl.engine.resume.DataStateHook`
  act when the stream starts;
* :class:`SkippedFilesHook`, :class:`ViewPairVisualizer`, :class:`ProbeHook`, :class:`CollapseGuard`,
  :class:`LoaderWaitWarning`: the count of skipped files, view-pair pictures in TensorBoard, the
  periodic retrieval probe, the collapse/stall guard, the warning when the model waits for data.
"""
import logging
import math
import os
import statistics

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.build import ResumableTrainingSampler
from .weight_norms import WEIGHT_NORM_PREFIX, WeightNormMonitor

__all__ = [
    "ModelStepHook", "PretrainLoader", "ViewPairVisualizer", "ProbeHook", "CollapseGuard", "TrainingCollapsed",
    "SkippedFilesHook", "LoaderWaitWarning", "build_pretrain_hooks",
]

logger = logging.getLogger(__name__)


def _logged_in_window(logged, key, iteration, window):
    """[(iteration, value)] of EventStorage history ``key`` over the iterations (iteration - window,
    iteration], in logging order; empty if ``key`` was never logged. ``logged``: ``storage.histories()``."""
    if key not in logged:
        return []
    return [(it, v) for v, it in logged[key].values() if iteration - window < it <= iteration]


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
        sampler = getattr(self.loader, "sampler", None)  # build_pretrain_train_loader's PretrainBatches
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
        from ..data.visualize import draw_sample

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
            logger.info(f"Retrieval probe at iter {self.trainer.iter + 1}: {result}")

    def after_step(self):
        it = self.trainer.iter + 1
        if it % self._period == 0 and it != self.trainer.max_iter:
            self._run()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._run()


class TrainingCollapsed(RuntimeError):
    """The collapse/stall guard stopped the run (``TEST.REGIONSSL.GUARD.STOP``); the message has the numbers."""


class CollapseGuard(HookBase):
    """Warn (and with ``stop`` raise :class:`TrainingCollapsed`) when a pretraining run collapses or stalls.

    Every ``period`` iterations from ``start_iter`` on, for each
    :class:`~regionssl.modeling.signals.LearningSignal` of the model, the median over the last
    ``window`` iterations of what the trainer and the model already logged is checked:

    * collapse: ``emb_std < min_emb_std_fraction / sqrt(D)`` (unit vectors spread uniformly over D
      dimensions have a per-dimension std of 1/sqrt(D); one vector for every input has 0);
    * collapse onto one direction: ``emb_rank < min_emb_rank`` (``embedding_rank``, the effective
      number of directions of a batch's embeddings: 1 when they lie on one line, as they do with
      either sign under an output BatchNorm, which keeps every dimension's std and so hides this
      from ``emb_std``; 1.05 is every pair at |cos| >= ~0.975);
    * stall, chance: ``loss / weight > chance - min_chance_margin`` (InfoNCE's ln(K+1), SwAV's
      ln K_c: the model does not tell the positive from the negatives);
    * stall, similarity: ``pos_sim - neg_sim < min_sim_gap``;
    * weights grown past fine-tuning: a stage's ``regionssl/weight_norm/<stage>`` (conv weight norm
      over its norm at random initialisation, :class:`~regionssl.engine.weight_norms.WeightNormMonitor`)
      above ``max_weight_norm_growth``. Warned about, never stopped for: the run learns, but a detector
      fine-tuned from it moves that stage ~ratio^2 times more slowly than a fresh one.

    A stall is reported once it has held at ``patience`` consecutive checks: a contrastive loss over a
    handful of keys (K = 7 at batch 8) swings by a few tenths of a nat from one window's median to the
    next, so a level that learns can touch its chance level once; one that does not stays there.
    Collapses are reported at the first check (noise does not bring every embedding together).

    Reads the EventStorage only (no forward pass). Each condition of each loss is warned about at
    most once per ``repeat_period`` iterations. The verdict is rank 0's (the losses are gathered
    there); with ``stop`` every process raises at the same iteration.
    """

    SIGNALS = ("loss", "emb_std", "emb_rank", "pos_sim", "neg_sim")

    def __init__(self, *, start_iter, period=20, window=20, min_emb_std_fraction=0.05, min_emb_rank=1.05,
                 min_chance_margin=0.05, min_sim_gap=0.01, max_weight_norm_growth=0.0, repeat_period=1000, stop=False,
                 patience=3):
        self.start_iter, self.period, self.window = start_iter, max(period, 1), max(window, 1)
        self.patience = max(patience, 1)
        self._streaks = {}  # (condition, loss key) -> consecutive checks it has held at
        self.max_weight_norm_growth = max_weight_norm_growth
        self.min_emb_std_fraction, self.min_emb_rank = min_emb_std_fraction, min_emb_rank
        self.min_chance_margin = min_chance_margin
        self.min_sim_gap, self.repeat_period, self.stop = min_sim_gap, repeat_period, stop
        self._last_warned = {}  # (condition, loss key) -> iteration

    @classmethod
    def from_config(cls, cfg):
        g = cfg.TEST.REGIONSSL.GUARD
        start = g.START_ITER
        if start < 0:
            start = max(cfg.SOLVER.WARMUP_ITERS, min(1000, cfg.SOLVER.MAX_ITER // 5))
        return cls(start_iter=start, period=g.PERIOD, window=g.WINDOW, min_emb_std_fraction=g.MIN_EMB_STD_FRACTION,
                   min_emb_rank=g.MIN_EMB_RANK, min_chance_margin=g.MIN_CHANCE_MARGIN, min_sim_gap=g.MIN_SIM_GAP,
                   max_weight_norm_growth=g.MAX_WEIGHT_NORM_GROWTH, repeat_period=g.REPEAT_PERIOD, stop=g.STOP,
                   patience=g.STALL_PATIENCE)

    def medians(self, storage, signal, iteration, only_loss=False):
        """{"loss", "emb_std", "emb_rank", "pos_sim", "neg_sim"}: median of each of ``signal``'s keys over the
        iterations (iteration - window, iteration], or None if absent or logged in fewer than half
        of them. ``only_loss``: the model has one loss, which Detectron2 logs as ``total_loss`` only."""
        logged, out = storage.histories(), {}
        for name in self.SIGNALS:
            key = getattr(signal, name)
            if name == "loss" and only_loss and key not in logged:
                key = "total_loss"
            values = [v for _, v in _logged_in_window(logged, key, iteration, self.window)]
            out[name] = statistics.median(values) if len(values) >= max(1, self.window // 2) else None
        return out

    def check(self, storage, signals, iteration):
        """Problems at ``iteration``: list of (condition, loss key, message)."""
        problems = []
        for s in signals:
            if s.weight <= 0:
                continue  # a loss weighted 0 trains nothing: its embeddings may stay as initialised
            med = self.medians(storage, s, iteration, only_loss=len(signals) == 1)
            context = self._context(s, med)
            if med["emb_std"] is not None and s.dim:
                threshold = self.min_emb_std_fraction / math.sqrt(s.dim)
                if med["emb_std"] < threshold:
                    problems.append(("collapse", s.loss, (
                        f"{s.emb_std} = {med['emb_std']:.4g} is below {self.min_emb_std_fraction} x 1/sqrt({s.dim}) "
                        f"= {threshold:.4g}: the embeddings of different inputs are (nearly) one vector. {context}")))
            if med["emb_rank"] is not None and med["emb_rank"] < self.min_emb_rank:
                problems.append(("collapse_direction", s.loss, (
                    f"{s.emb_rank} = {med['emb_rank']:.4g} is below {self.min_emb_rank} effective directions: the "
                    f"embeddings of different inputs lie on (nearly) one line, with either sign. {context}")))
            if med["loss"] is not None and s.chance is not None:
                loss = med["loss"] / s.weight
                if loss > s.chance - self.min_chance_margin:
                    problems.append(("stall_chance", s.loss, (
                        f"{s.loss}{'' if s.weight == 1 else f' / {s.weight:g}'} = {loss:.4f} is not below its chance "
                        f"level {s.chance:.4f} ({s.chance_text}) by {self.min_chance_margin}: positives are not told "
                        f"from negatives. {context}")))
            if med["pos_sim"] is not None and med["neg_sim"] is not None:
                gap = med["pos_sim"] - med["neg_sim"]
                if gap < self.min_sim_gap:
                    problems.append(("stall_similarity", s.loss, (
                        f"{s.pos_sim} - {s.neg_sim} = {gap:.4f} is below {self.min_sim_gap}: positives are not more "
                        f"similar than negatives. {context}")))
        return problems

    def persistent(self, problems):
        """The ``problems`` of this check to report: every collapse, and the stalls that have held at the
        last ``patience`` checks (this one included). Call once per check: it counts the streaks."""
        self._streaks = {(kind, key): self._streaks.get((kind, key), 0) + 1 for kind, key, _ in problems}
        return [p for p in problems if p[0].startswith("collapse") or self._streaks[p[:2]] >= self.patience]

    def _line(self, kind, msg, it):
        if kind.startswith("collapse"):
            return f"COLLAPSED at iteration {it}: {msg}"
        if self.patience == 1:
            return f"STALLED at iteration {it}: {msg}"
        return f"STALLED at iterations {it - (self.patience - 1) * self.period}-{it} ({self.patience} checks): {msg}"

    def check_weight_norms(self, storage, iteration):
        """Stages grown past ``max_weight_norm_growth`` at ``iteration``: list of ("weight_growth", key,
        message), from the last ratio each stage logged up to ``iteration`` (none when the limit is 0)."""
        if self.max_weight_norm_growth <= 0:
            return []
        logged, problems = storage.histories(), []
        for key in sorted(k for k in logged if k.startswith(WEIGHT_NORM_PREFIX)):
            values = _logged_in_window(logged, key, iteration, iteration + 1)
            if not values or values[-1][1] <= self.max_weight_norm_growth:
                continue
            ratio, stage = values[-1][1], key[len(WEIGHT_NORM_PREFIX):]
            problems.append(("weight_growth", key, (
                f"{key} = {ratio:.2f} is above {self.max_weight_norm_growth:g}: the {stage} conv weights are "
                f"{ratio:.2f}x their norm at random initialisation, so a detector fine-tuned from them moves "
                f"this stage ~{ratio * ratio:.0f}x more slowly than a fresh one (the step on a scale-invariant "
                "weight's direction is ~lr / |w|^2)")))
        return problems

    def _context(self, s, med):
        parts = [f"{name} {med[name]:.4g}" for name in self.SIGNALS if med[name] is not None]
        if s.chance is not None:
            parts.append(f"chance {s.chance:.4f}")
        return f"[{s.loss}: {', '.join(parts)}; medians over the last {self.window} iterations]"

    def after_step(self):
        it = self.trainer.iter
        if it < self.start_iter or (it + 1) % self.period:
            return
        problems, growth = [], []
        if comm.is_main_process():
            model = _bare(self.trainer.model)
            signals = model.learning_signals() if hasattr(model, "learning_signals") else []
            problems = self.persistent(self.check(get_event_storage(), signals, it))
            growth = self.check_weight_norms(get_event_storage(), it)
        if self.stop and comm.get_world_size() > 1:
            problems = comm.all_gather(problems)[0]  # rank 0's verdict, so that every rank stops
        lines = [self._line(kind, msg, it) for kind, _, msg in problems]
        if problems and self.stop:
            raise TrainingCollapsed("Pretraining stopped by TEST.REGIONSSL.GUARD.STOP:\n" + "\n".join(lines))
        self._warn("this run is not learning", problems, lines, it,
                   "STOP True stops such runs, ENABLED False silences this")
        self._warn("these weights will fine-tune slowly", growth, [f"GREW at iteration {it}: {msg}" for *_, msg in growth],
                   it, "lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS; MAX_WEIGHT_NORM_GROWTH 0 silences this")

    def _warn(self, title, problems, lines, it, remedy):
        """Log the lines of the problems not warned about in the last ``repeat_period`` iterations."""
        fresh = []
        for (kind, key, _), line in zip(problems, lines):
            if it - self._last_warned.get((kind, key), -math.inf) >= self.repeat_period:
                self._last_warned[(kind, key)] = it
                fresh.append(line)
        if fresh:
            logger.warning(
                f"regionssl guard: {title}\n  " + "\n  ".join(fresh)
                + f"\n  (TEST.REGIONSSL.GUARD: {remedy}; repeated at most every {self.repeat_period} iterations)"
            )


class LoaderWaitWarning(HookBase):
    """Warn when the model waits for its data: the data loader, not the model, sets the speed.

    Every ``window`` iterations from the second window on (the first is the loader workers'
    start-up), the sum of Detectron2's ``data_time`` (time in ``next(data_loader)``, the slowest
    process's) over the last ``window`` iterations is divided by the sum of their ``time`` (the
    whole iteration, from ``IterationTimer``). Above ``max_fraction`` the main process logs the
    fraction and the remedies; a wait that persists is warned about again after 10 windows.
    ``on_device_hint``: the colour ops could move to the model's device (a CUDA model that does
    not yet do so), so the message suggests it.
    """

    def __init__(self, *, max_fraction, window, num_workers, on_device_hint):
        self.max_fraction, self.window = max_fraction, max(int(window), 1)
        self.num_workers, self.on_device_hint = num_workers, on_device_hint
        self._last_warned = -math.inf

    @classmethod
    def from_config(cls, cfg):
        w = cfg.TEST.REGIONSSL.LOADER_WAIT
        hint = cfg.MODEL.DEVICE.startswith("cuda") and not cfg.INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE
        return cls(max_fraction=w.MAX_FRACTION, window=w.WINDOW, num_workers=cfg.DATALOADER.NUM_WORKERS,
                   on_device_hint=hint)

    def wait_fraction(self, storage, iteration):
        """sum(data_time) / sum(time) over the iterations (iteration - window, iteration] that have
        both, or None when fewer than half of them do."""
        logged = storage.histories()
        data = dict(_logged_in_window(logged, "data_time", iteration, self.window))
        step = dict(_logged_in_window(logged, "time", iteration, self.window))
        both = data.keys() & step.keys()
        total = sum(step[it] for it in both)
        if len(both) < max(1, self.window // 2) or total <= 0:
            return None
        return sum(data[it] for it in both) / total

    def after_step(self):
        it = self.trainer.iter
        first = self.trainer.start_iter + 2 * self.window - 1
        if not comm.is_main_process() or it < first or (it - first) % self.window:
            return
        fraction = self.wait_fraction(get_event_storage(), it)
        if fraction is None or fraction <= self.max_fraction or it - self._last_warned < 10 * self.window:
            return
        self._last_warned = it
        remedies = [f"more loader workers per process if the node has idle cores (DATALOADER.NUM_WORKERS, now "
                    f"{self.num_workers})"]
        if self.on_device_hint:
            remedies.append("INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE True (the colour ops run on the GPU)")
        logger.warning(
            f"regionssl: the model waited for data {fraction:.0%} of the time of iterations "
            f"{it - self.window + 1}-{it} (data_time / time; above {self.max_fraction:.0%}). Remedies: "
            + "; ".join(remedies) + ". TEST.REGIONSSL.LOADER_WAIT.MAX_FRACTION 0.0 silences this."
        )


def build_pretrain_hooks(cfg, trainer):
    hooks = [SkippedFilesHook(cfg.OUTPUT_DIR)]
    if cfg.TEST.REGIONSSL.WEIGHT_NORM_PERIOD > 0:  # before the guard, which reads what it logs
        hooks.append(WeightNormMonitor(trainer.model, cfg.TEST.REGIONSSL.WEIGHT_NORM_PERIOD))
    if cfg.TEST.REGIONSSL.LOADER_WAIT.MAX_FRACTION > 0:
        hooks.append(LoaderWaitWarning.from_config(cfg))
    if cfg.TEST.REGIONSSL.GUARD.ENABLED:
        hooks.append(CollapseGuard.from_config(cfg))
    if cfg.VIS_PERIOD > 0:
        hooks.append(ViewPairVisualizer(cfg.VIS_PERIOD))
    if cfg.TEST.REGIONSSL.PROBE_PERIOD > 0:
        hooks.append(ProbeHook(cfg, cfg.TEST.REGIONSSL.PROBE_PERIOD))
    return hooks

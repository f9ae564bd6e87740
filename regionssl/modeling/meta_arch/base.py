"""What every regionssl pretraining meta-architecture shares.

A method is an encoder (``regionssl/modeling/encoders.py``, one module per trunk layout) + heads +
a learning rule. Module names (the checkpoint contract, docs/design.md):

* online encoder: its parts are registered here under the detector's names, ``backbone.*`` and,
  when the layout pretrains them, ``roi_heads.res5.*`` (C4) or ``roi_heads.box_head.*`` (FPN), so
  a pretraining checkpoint is a valid ``MODEL.WEIGHTS`` for fine-tuning;
* target encoder (methods with a momentum network): the same parts under ``momentum.*``;
* everything else (``projector``, ``predictor``, ``queues.*``, ``prototypes``) uses names no
  detector key ends with.

Subclasses implement ``losses(batched_inputs) -> dict`` and may override ``region_embedding``.

Step-dependent state comes from the trainer, not from global state: before each optimizer step
``regionssl.engine.hooks.ModelStepHook`` calls :meth:`RegionSSLBase.before_step` with the global
iteration (every schedule reads ``self.iteration``), and after the optimizer step
:meth:`RegionSSLBase.after_step` (the EMA of the target network, as the official codes order it).
Code that drives the model without a trainer calls the two itself.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from torch import nn

from ...data.batching import stacked_rows
from ...data.photometric_batch import apply_photometric
from ...utils.distributed import to_device
from ..encoders import build_encoder
from ..momentum import ema_update, make_momentum_copy, momentum_at

__all__ = ["RegionSSLBase"]


class RegionSSLBase(nn.Module):
    """Online encoder + helpers; no learning rule.

    Args:
        encoder: the online :class:`~regionssl.modeling.encoders.Encoder`; its parts become this
            module's ``backbone`` (and ``roi_heads``).
        pixel_mean, pixel_std: (3,) RGB normalisation, the same as the detector's.
        max_iter: SOLVER.MAX_ITER, for schedules that are functions of the global iteration.
        momentum_base, momentum_schedule: EMA coefficient and its schedule.

    Attributes:
        encoder, target_encoder: the online encoder and (after :meth:`build_momentum`) the target
            one; plain attributes, their parts are registered under the detector's names.
    """

    # Methods that compare whole images set this to True (MoCo-v2, BYOL, SwAV, CVSA; ReSim's
    # instance branch): the default encoder then pools whole images (encoders.default_encoder_name).
    is_global = False
    # The global iteration of the current optimizer step (before_step); schedules read it.
    iteration = 0
    # The target network's encoder, for methods with one (build_momentum).
    target_encoder = None
    # Config keys (dotted) whose values count iterations, e.g. a schedule's start: scaled with
    # SOLVER.MAX_ITER when the world size differs from SOLVER.REFERENCE_WORLD_SIZE
    # (regionssl.engine.setup.auto_scale_workers), so the recipe keeps its shape in epochs.
    iteration_keys = ()

    @configurable
    def __init__(self, *, encoder, pixel_mean, pixel_std, max_iter, momentum_base=0.999, momentum_schedule="constant"):
        super().__init__()
        for name, part in encoder.parts().items():  # backbone (, roi_heads): the detector's names
            self.add_module(name, part)
        object.__setattr__(self, "encoder", encoder)  # not a child: its parts are registered above
        self.max_iter = max_iter
        self.momentum_base, self.momentum_schedule = momentum_base, momentum_schedule
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Diagnostics of the step, read from the device together (see ``log``/``flush_logs``).
        # True when a trainer flushes them with its loss values (PretrainTrainer); else forward does.
        self.defer_log_flush = False
        self._pending_logs, self._in_forward = [], False

    @classmethod
    def from_config(cls, cfg):
        r = cfg.MODEL.REGIONSSL
        return {
            "encoder": build_encoder(cfg, image_level=cls.is_global),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "momentum_base": r.MOMENTUM.BASE,
            "momentum_schedule": r.MOMENTUM.SCHEDULE,
        }

    # ---------------------------------------------------------------- helpers
    @property
    def device(self):
        return self.pixel_mean.device

    def online_modules(self, *heads):
        """{name: module} of the online encoder's parts (+ the ``heads`` named) for EMA/momentum copies."""
        return {**self.encoder.parts(), **{n: getattr(self, n) for n in heads}}

    def build_momentum(self, *heads):
        """The target network: ``self.momentum``, frozen copies of the online encoder's parts and of
        ``heads`` (``momentum.backbone``, ``momentum.projector``, ...), and ``self.target_encoder``,
        the encoder made of those copies."""
        self.momentum = make_momentum_copy(self.online_modules(*heads))
        target = self.encoder.with_parts({n: self.momentum[n] for n in self.encoder.parts()})
        object.__setattr__(self, "target_encoder", target)

    def needs_find_unused_parameters(self):
        """Whether DistributedDataParallel must look for parameters that get no gradient.

        False for every method whose loss reaches each trainable parameter on every step (a level
        or a process without regions still adds a zero connected to the graph); True costs a graph
        traversal per step. Parameters a method never uses are frozen (``requires_grad=False``,
        e.g. ReSim-FPN's ``fpn_output5``), which DDP ignores.
        """
        return False

    # ---------------------------------------------------------------- step-dependent state
    def before_step(self, iteration):
        """Start of the optimizer step at global ``iteration`` (the trainer's ``iter``), before its
        first forward (``ModelStepHook``). Schedules are functions of it, so resume is exact."""
        self.iteration = iteration

    def after_step(self):
        """After the step's optimizer update (``ModelStepHook``; once per step, also with gradient
        accumulation): the EMA of the target network with this iteration's coefficient."""
        if self.target_encoder is not None:
            self.update_momentum()

    def current_momentum(self):
        """EMA coefficient of this iteration (applied after its optimizer step)."""
        return momentum_at(self.iteration, self.max_iter, self.momentum_base, self.momentum_schedule)

    @torch.no_grad()
    def update_momentum(self):
        """``xi <- m xi + (1 - m) theta`` from the online into the target network; returns m."""
        m = self.current_momentum()
        ema_update({name: getattr(self, name) for name in self.momentum.keys()}, self.momentum, m)
        return m

    def batch_coupling(self):
        """Reasons (strings) why k micro-batches of B/k do not give the update of one batch of B,
        beyond BatchNorm (which the trainer detects from the modules). Empty: the loss is a mean of
        per-sample terms. Methods override this (SwAV: Sinkhorn, ReSim: in-batch negatives)."""
        return []

    def view_pixels(self, views):
        """List of (3, H, W) uint8 tensors (one size) -> (N, 3, H, W) uint8 on the model device.

        One non-blocking copy (asynchronous from the loader's pinned memory) when the views are the
        adjacent rows of one loader buffer (``batching.pack_batch``), else one per view.
        """
        rows = stacked_rows(views)
        if rows is not None:
            return rows.to(self.device, non_blocking=True, copy=True)
        return torch.stack([v.to(self.device, non_blocking=True) for v in views])

    def view_uint8(self, batched_inputs, v):
        """(N, 3, H, W) uint8 images of view ``v`` on the model device; when the mapper shipped the
        photometric draws instead of applying them (``"photometric"``, INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE),
        they are applied here, batched."""
        x = self.view_pixels([d["views"][v] for d in batched_inputs])
        if "photometric" in batched_inputs[0]:
            x = apply_photometric(x, torch.stack([d["photometric"][v] for d in batched_inputs]))
        return x

    def model_input(self, x):
        """(N, 3, H, W) uint8 pixels -> normalised float, padded for the backbone.

        Padded with zeros (= the mean pixel) at the bottom/right up to the backbone's
        ``size_divisibility`` (FPN: 32; a 112 px view would otherwise break the top-down sum).
        Box coordinates are unchanged by this padding. A floating-point batch is taken as
        normalised already and returned as is.
        """
        if x.is_floating_point():
            return x
        x = (x.float() - self.pixel_mean) / self.pixel_std
        d = self.backbone.size_divisibility
        if d > 1:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        return x

    def normalize(self, views):
        """List of (3, H, W) uint8 tensors (one size) -> (N, 3, H', W') normalised float on the model
        device (:meth:`view_pixels` then :meth:`model_input`)."""
        return self.model_input(self.view_pixels(views))

    def view_batch(self, batched_inputs, v):
        """Images of view ``v`` of every input: (N, 3, H, W) normalised."""
        return self.model_input(self.view_uint8(batched_inputs, v))

    def view_boxes(self, batched_inputs, v, key="boxes"):
        """Per-image (R_i, 4) boxes of view ``v`` on the model device, only valid rows.

        Selected on the host (the loader's tensors), then moved in one non-blocking copy and split:
        no per-image copy, no device sync.
        """
        host = [d[key][v] if key == "boxes" else d[key] for d in batched_inputs]
        host = [b[d["valid"]] if "valid" in d else b for b, d in zip(host, batched_inputs)]
        flat = to_device(torch.cat(host), self.device)
        return list(flat.split([len(b) for b in host]))

    def log(self, **scalars):
        """Put diagnostics under ``regionssl/<name>`` in the EventStorage (if a trainer runs).

        During ``forward`` tensor values stay on the device: :meth:`flush_logs` reads all of a
        step's values with one device -> host copy (at the end of ``forward``, or with the losses
        when a trainer defers it), instead of one GPU sync per scalar. Outside ``forward`` (a helper
        called directly) they are put right away.
        """
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        for k, v in scalars.items():
            if v is None:
                continue  # nothing to report this step (e.g. embedding_rank of one row)
            value = v.detach().float().reshape(()) if torch.is_tensor(v) else float(v)
            self._pending_logs.append((f"regionssl/{k}", value, storage.iter))
        if not (self._in_forward or self.defer_log_flush):
            self.flush_logs()

    def flush_logs(self, extra=()):
        """Put the pending diagnostics into the EventStorage; return ``extra`` scalars as floats.

        Every pending tensor and every tensor of ``extra`` (e.g. the step's losses) is read with
        **one** device -> host copy.
        """
        pending, self._pending_logs = self._pending_logs, []
        tensors = [v for _, v, _ in pending if torch.is_tensor(v)] + [t.detach().float().reshape(()) for t in extra]
        values = torch.stack(tensors).tolist() if tensors else []
        read = iter(values)
        if pending:
            storage = get_event_storage()
            for name, v, it in pending:
                storage.put_scalar(name, next(read) if torch.is_tensor(v) else v, cur_iter=it)
        return list(read)

    @staticmethod
    def embedding_std(z):
        """Mean per-dimension std of L2-normalised embeddings; ~1/sqrt(D) healthy, ->0 on collapse."""
        return F.normalize(z.float(), dim=1).std(dim=0).mean()

    @staticmethod
    def embedding_rank(z):
        """Effective number of directions the L2-normalised embeddings ``z`` (R, D) span.

        The participation ratio of their Gram matrix, ``R^2 / sum_ij cos(z_i, z_j)^2`` (the number
        of equal eigenvalues with the same spread): 1 when every row lies on one line (also ``+v``
        and ``-v``), min(R, D) when the rows are orthogonal; R rows with pairwise |cos| = c give
        R / (1 + (R - 1) c^2). It sees what ``embedding_std`` cannot: under an output BatchNorm every
        dimension keeps its std while all rows collapse onto one direction with either sign. Matrix
        products only (no decomposition, so no device sync). None for fewer than 2 rows (not logged).
        """
        z = F.normalize(z.float(), dim=1)
        r, d = z.shape
        if r < 2:
            return None
        gram = z @ z.t() if r <= d else z.t() @ z  # same non-zero eigenvalues; the smaller one
        return r * r / gram.square().sum()

    # ---------------------------------------------------------------- interface
    def region_embedding(self, images, boxes):
        """Online representation of regions (before any projector), for the retrieval probe.

        Args:
            images: (N, 3, H, W) normalised; boxes: list of N (R_i, 4) tensors.
        Returns:
            (sum R_i, C) for region methods; for global methods the same pooled on each box
            with the res5 RoI pooling, so every method is probed on the same regions.
        """
        return self.encoder.probe_regions(images, boxes)

    def losses(self, batched_inputs):
        raise NotImplementedError

    def learning_signals(self):
        """List of :class:`~regionssl.modeling.signals.LearningSignal`: the losses the collapse/stall
        guard watches (chance level, embedding dim, diagnostic keys). Empty: nothing is watched."""
        return []

    def forward(self, batched_inputs):
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__} is a pretraining model: use region_embedding() for features; "
                "evaluation happens by fine-tuning a detector."
            )
        if not isinstance(batched_inputs[0], dict) or "views" not in batched_inputs[0]:
            raise ValueError("Pretraining models need the regionssl mapper's output (dicts with 'views')")
        self._in_forward = True
        try:
            losses = self.losses(batched_inputs)
        finally:
            self._in_forward = False
        if not self.defer_log_flush:
            self.flush_logs()
        return losses

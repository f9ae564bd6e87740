"""SwAV: Swapping Assignments between Views (Caron et al., NeurIPS'20), docs/methods/swav.md.

Each crop v of an image is embedded, ``z_v = normalize(g(avgpool(res5(x_v))))`` (g: MLP
2048-2048(BN, ReLU)-128), and scored against K_c prototypes ``C`` (``nn.Linear(128, K_c, bias=False)``,
rows re-normalised at the start of every step): ``s_v = z_v C^T``. Codes ``q_s`` of the crops in
``CROPS_FOR_ASSIGN`` (the two large crops) come from Sinkhorn-Knopp on the global batch
(eps = 0.05, 3 iterations); every other crop predicts them,
``L = 1/|S| sum_s 1/(V-1) sum_{v != s} -mean_b sum_k q_s log softmax(s_v / tau)`` (tau = 0.1).
The prototypes get no gradient during the first ``FREEZE_PROTOTYPES_ITERS`` iterations. There is no
momentum encoder. Crops of equal size go through the backbone together (official multi-resolution
forward); the projector sees all crops at once.

Queue (small batches, official ``--queue_length 3840 --epoch_queue_starts 15``): buffer
``queue`` (|S|, L, D), newest rows first, and ``queue_fill`` (scalar, rows written, <= L). From
global iteration ``QUEUE_START_ITER`` on, every step writes the *global* batch's embeddings of crop
S_i (all-gathered in rank order) at the front of ``queue[i]``; once the queue is full its scores
``queue[i] C^T`` join the Sinkhorn problem as extra samples and only the batch rows' codes are
kept. Official equivalents: the queue is zero-initialised at the start epoch and used once its last
row is non-zero, i.e. once full (``main_swav.py``); the current batch is written after its scores
were taken.

Distributed choice. The official code keeps one queue of L / world_size rows per rank (files
``queue{rank}.pth``), so its global Sinkhorn problem is "all ranks' queue rows ∪ global batch".
Here every rank holds the same full queue (in the checkpoint, resumes exactly), so each rank feeds
only a disjoint slice of it to the all-reduced Sinkhorn: rank r contributes rows
``tensor_split(queue[i], world_size)[r]`` plus its own batch rows. The global problem is then
exactly "queue ∪ global batch", the same as one process holding the whole batch and the same queue
(Sinkhorn is row-permutation equivariant; results agree to float rounding).

Freezing: while frozen the scores use ``C.detach()``, so no gradient reaches ``prototypes.weight``.
Its ``.grad`` stays None (DDP with ``find_unused_parameters=True`` leaves globally unused
parameters' grads untouched), hence SGD/LARS skip it entirely: no weight decay, no momentum, as the
official ``p.grad = None``. Being a function of the global iteration, it resumes exactly.

Region variant (``SWAV.REGION``; beyond the paper): in addition to ``loss_swav``, the same
swapped prediction on RoI features of the mapper's aligned boxes (``IntersectionBoxes`` over the two
large crops, views 0 and 1): RoIAlign on res5 (SCRL-style, ``ROI.POOLER_RESOLUTION`` 1), spatial
mean, the shared projector and prototypes; codes of the regions of crop 0 and of crop 1 (Sinkhorn
over all regions of the global batch, no queue), each predicted from the other crop's region
(``loss_swav_region``). Small crops are left out: they do not contain the boxes.
"""
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from torch import nn

from ...utils.distributed import all_gather_cat
from ...utils.micro_batch import rows_at_step_end
from ..encoders import GlobalEncoder
from ..heads import MLP
from ..poolers import BoxPooler
from ..signals import LearningSignal
from ..sinkhorn import sinkhorn_knopp, swav_loss
from .base import RegionSSLBase

__all__ = ["SwAV"]


def _forget_host_queue_fill(module, *args):
    """load_state_dict pre-hook: the loaded ``queue_fill`` replaces the host copy."""
    module._queue_fill_host = None


@META_ARCH_REGISTRY.register()
class SwAV(RegionSSLBase):
    """SwAV on the shared ResNet-50 (``backbone.*``).

    Extra args:
        projector: g, MLP 2048 -> 2048 (BN, ReLU) -> D = 128 (SyncBN: the official ``--sync_bn
            pytorch`` converts every BN of the model, the projector's included).
        num_prototypes: K_c (3000).
        temperature: tau (0.1); epsilon: Sinkhorn eps (0.05); sinkhorn_iters: 3.
        crops_for_assign: S, crops that get codes ([0, 1]).
        freeze_prototypes_iters: no prototype gradient for global iterations < this (5005 at B=256).
        queue_length: L rows per assigned crop (0 = no queue); queue_start_iter: first writing iter.
        region_pooler: :class:`BoxPooler` on res5 for the region variant, or None.
    """

    is_global = True
    iteration_keys = ("MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS", "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER")

    @configurable
    def __init__(self, *, projector, num_prototypes, temperature, epsilon, sinkhorn_iters,
                 crops_for_assign, freeze_prototypes_iters, queue_length, queue_start_iter,
                 region_pooler=None, **kwargs):
        super().__init__(**kwargs)
        assert isinstance(self.encoder, GlobalEncoder) and "res5" in self.backbone.output_shape(), (
            "SwAV needs a ResNet backbone (res5), not an FPN")
        self.projector = projector
        dim = projector.out_features
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self.normalize_prototypes()  # unit rows from the start: frozen prototypes never move
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.crops_for_assign = list(crops_for_assign)
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self.queue_length, self.queue_start_iter = queue_length, queue_start_iter
        # (|S|, L, D) embeddings of the assigned crops, newest first; identical on every rank.
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), queue_length, dim))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))  # rows written (<= L)
        # Host copy of queue_fill, so deciding to use the queue needs no GPU sync each step: 0 at
        # construction, read once after loading (the load hook forgets it), then kept in step.
        # The buffer is written only here and by load_state_dict.
        self._queue_fill_host = 0
        self._register_load_state_dict_pre_hook(_forget_host_queue_fill, with_module=True)
        self.region_pooler = region_pooler

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        r, s = cfg.MODEL.REGIONSSL, cfg.MODEL.REGIONSSL.SWAV
        encoder = args["encoder"]
        projector = MLP(encoder.out_channels, r.PROJECTOR.HIDDEN_DIM, r.PROJECTOR.OUT_DIM, r.PROJECTOR.NORM)
        region_pooler = None
        if s.REGION:
            strides = {"res5": encoder.backbone.output_shape()["res5"].stride}
            region_pooler = BoxPooler(["res5"], strides, r.ROI.POOLER_RESOLUTION, r.ROI.SAMPLING_RATIO, r.ROI.ALIGNED)
        args.update(
            projector=projector,
            num_prototypes=s.NUM_PROTOTYPES,
            temperature=s.TEMPERATURE,
            epsilon=s.EPSILON,
            sinkhorn_iters=s.SINKHORN_ITERS,
            crops_for_assign=list(s.CROPS_FOR_ASSIGN),
            freeze_prototypes_iters=s.FREEZE_PROTOTYPES_ITERS,
            queue_length=s.QUEUE_LENGTH,
            queue_start_iter=s.QUEUE_START_ITER,
            region_pooler=region_pooler,
        )
        return args

    def batch_coupling(self):
        return ["Sinkhorn-Knopp spreads the codes of the batch (and queue) evenly over the prototypes: "
                "the codes of a micro-batch of B/k differ from those the same images get in a batch of B"]

    # ---------------------------------------------------------------- prototypes
    def needs_find_unused_parameters(self):
        """True while prototypes can be frozen: their scores then use ``C.detach()``, so the weight is
        unused on those steps (DDP leaves its ``.grad`` None and the optimizer skips it)."""
        return self.freeze_prototypes_iters > 0

    def prototypes_frozen(self):
        return self.iteration < self.freeze_prototypes_iters

    def before_step(self, iteration):
        """The official loop's start of an iteration: prototypes re-normalised to unit rows."""
        super().before_step(iteration)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self):
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def prototype_scores(self, z):
        """(N, D) unit embeddings -> (N, K_c) float32 scores ``z C^T`` (no gradient to C while frozen)."""
        w = self.prototypes.weight
        if self.prototypes_frozen():
            w = w.detach()
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.linear(z.float(), w.float())

    # ---------------------------------------------------------------- queue
    def queue_rows_written(self):
        """``queue_fill`` as a host int (read from the device once after loading a state)."""
        if self._queue_fill_host is None:
            self._queue_fill_host = int(self.queue_fill)
        return self._queue_fill_host

    def queue_ready(self):
        return self.queue_length > 0 and self.queue_rows_written() >= self.queue_length

    @torch.no_grad()
    def _queue_scores(self, i):
        """Scores (L_r, K_c) of this rank's disjoint slice of queue ``i`` (see module docstring).

        float32 with autocast off, like the batch rows' scores: under AMP an fp16 product would be
        off by ~1e-3, i.e. ~0.01 after Sinkhorn's division by eps.
        """
        rows = torch.tensor_split(self.queue[i], comm.get_world_size())[comm.get_rank()]
        with torch.autocast(device_type=rows.device.type, enabled=False):
            return F.linear(rows.float(), self.prototypes.weight.float())

    @torch.no_grad()
    def _enqueue(self, i, z):
        """Write the global batch's rows (all-gathered z: (N, D)) at the front of queue ``i``."""
        counts = [z.shape[0]] * comm.get_world_size()  # N images on every rank: no count exchange
        gathered, _ = all_gather_cat(z.detach().to(self.queue.dtype), counts)  # (B, D), rank order
        self.queue[i] = torch.cat([gathered, self.queue[i]])[: self.queue_length]
        return gathered.shape[0]

    # ---------------------------------------------------------------- learning rule
    @torch.no_grad()
    def assign_codes(self, z, scores):
        """Sinkhorn codes of the crops in S, using (and then updating) the queue.

        Args:
            z: (V, N, D) unit embeddings of this rank's N images; scores: V tensors (N, K_c).
        Returns:
            list of |S| tensors (N, K_c), rows summing to 1.
        """
        n = z.shape[1]
        use_queue = self.queue_ready()  # decided before this step's writes (official order)
        write = self.queue_length > 0 and self.iteration >= self.queue_start_iter
        codes, written = [], 0
        for i, s in enumerate(self.crops_for_assign):
            out = scores[s].detach()
            if use_queue:
                out = torch.cat([self._queue_scores(i), out])  # (L_r + N, K_c)
            codes.append(sinkhorn_knopp(out, self.epsilon, self.sinkhorn_iters)[-n:])
            rows = rows_at_step_end(self, i, z[s].detach()) if write else None  # once per optimizer step
            if rows is not None:
                written = self._enqueue(i, rows)
        if write:
            self._queue_fill_host = min(self.queue_rows_written() + written, self.queue_length)
            self.queue_fill.fill_(self._queue_fill_host)
        return codes

    def swapped_prediction(self, z):
        """SwAV loss of embeddings z (V, N, D); returns (loss, codes). Updates the queue."""
        scores = [self.prototype_scores(z[v]) for v in range(z.shape[0])]
        codes = self.assign_codes(z, scores)
        return swav_loss(scores, codes, self.crops_for_assign, self.temperature), codes

    def embed_crops(self, batched_inputs):
        """Unit embeddings (V, N, D) of every crop, and the per-crop res5 maps (list of V (N, C, h, w))."""
        sizes = [tuple(v.shape[-2:]) for v in batched_inputs[0]["views"]]
        n, pooled, maps = len(batched_inputs), [], []
        start = 0
        while start < len(sizes):  # one backbone pass per run of equal-size crops
            end = start
            while end < len(sizes) and sizes[end] == sizes[start]:
                end += 1
            x = torch.cat([self.view_batch(batched_inputs, v) for v in range(start, end)])
            features = self.encoder.features(x)  # res5: ((end - start) N, 2048, h, w)
            pooled.append(self.encoder.pool(features)[0])
            maps.extend(features["res5"].split(n))
            start = end
        z = F.normalize(self.projector(torch.cat(pooled)), dim=1)  # (V N, D), crop-major
        return z.view(len(sizes), n, -1), maps

    def region_swapped_prediction(self, batched_inputs, maps):
        """Region variant: swapped prediction between the aligned boxes of crops 0 and 1."""
        feats = [
            self.region_pooler({"res5": maps[v]}, self.view_boxes(batched_inputs, v))[0].mean(dim=(2, 3))  # (R, 2048)
            for v in (0, 1)
        ]
        z = F.normalize(self.projector(torch.cat(feats)), dim=1).view(2, feats[0].shape[0], -1)
        scores = [self.prototype_scores(z[v]) for v in (0, 1)]
        codes = [sinkhorn_knopp(s.detach(), self.epsilon, self.sinkhorn_iters) for s in scores]
        return swav_loss(scores, codes, [0, 1], self.temperature), z

    def learning_signals(self):
        """Swapped prediction at chance (uniform prediction over K_c prototypes) is ln K_c."""
        k, dim = self.prototypes.weight.shape
        chance, text = math.log(k), f"ln K_c, K_c = {k} prototypes"
        signals = [LearningSignal("loss_swav", chance, text, emb_std="regionssl/emb_std", dim=dim,
                                  emb_rank="regionssl/emb_rank")]
        if self.region_pooler is not None:
            signals.append(LearningSignal("loss_swav_region", chance, text, emb_std="regionssl/emb_std_region",
                                          dim=dim, emb_rank="regionssl/emb_rank_region"))
        return signals

    def losses(self, batched_inputs):
        z, maps = self.embed_crops(batched_inputs)
        loss, codes = self.swapped_prediction(z)
        losses = {"loss_swav": loss}
        if self.region_pooler is not None:
            losses["loss_swav_region"], zr = self.region_swapped_prediction(batched_inputs, maps)
        with torch.no_grad():  # diagnostics: no autograd graph
            if self.region_pooler is not None:
                self.log(num_pairs=zr.shape[1], emb_std_region=self.embedding_std(zr[0]),
                         emb_rank_region=self.embedding_rank(zr[0]))
            q = codes[0]
            used = q.new_zeros(q.shape[1]).index_fill_(0, q.argmax(dim=1), 1.0)  # no unique(): no sync
            self.log(
                code_entropy=-(q * q.clamp_min(1e-12).log()).sum(dim=1).mean(),  # nats, <= ln K_c
                proto_usage=used.mean(),  # fraction of prototypes that are some local sample's argmax code
                emb_std=self.embedding_std(z[0]),
                emb_rank=self.embedding_rank(z[0]),
                queue_fill=self.queue_rows_written() / self.queue_length if self.queue_length else 0.0,
                num_crops=z.shape[0],
                prototypes_frozen=float(self.prototypes_frozen()),
            )
        return losses

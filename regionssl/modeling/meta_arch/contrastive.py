"""MoCo-style learning rule shared by InsLoc, MoCo-v2 and ReSim's instance branch.

Query q from the online encoder, key k from the momentum encoder (shuffle-BN), negatives from
one queue per level, loss InfoNCE with temperature T (He et al. 2020; Chen et al. 2020). With
``MODEL.REGIONSSL.QUEUE.SIZE 0`` there is no queue: the negatives of a query are the other keys of
the global batch, as in MoCo v3 (Chen, Xie, He, ICCV'21), so positive and negatives always come
from the same key encoder (no stale negatives; see docs/learning.md for why small runs need it).
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm

from ...config import per_level
from ...utils.distributed import all_gather_cat, world_size
from ..heads import MLP
from ..losses import info_nce, info_nce_in_batch
from ..queues import KeyQueues
from ..shuffle import ShufflePlan, shuffled_forward, split_forward
from ..signals import LearningSignal, info_nce_chance
from .base import RegionSSLBase

__all__ = ["ContrastiveBase"]


class ContrastiveBase(RegionSSLBase):
    """InfoNCE between view-0 queries and view-1 keys on every pooled level.

    Extra args:
        projector: g, MLP from the region feature dim C to D (MoCo-v2: 2048-2048-128).
        queue_size: K negatives per level (65536); 0 = no queue, the other keys of the global
            batch are the negatives (MoCo v3).
        temperature: T (0.2).
        level_weights: w_l per level (InsLoc: all 1).
        shuffle_bn: shuffle keys across processes before the key encoder (MoCo).
        bn_splits: run query and key batches in this many groups per process (per-group BN),
            keys shuffled across groups: shuffle-BN in one process (1 = off).
    """

    @configurable
    def __init__(self, *, projector, queue_size, temperature, level_weights, shuffle_bn=True, bn_splits=1, **kwargs):
        super().__init__(**kwargs)
        self.projector = projector
        self.build_momentum("projector")
        self.levels = list(self.encoder.levels)
        assert len(level_weights) == len(self.levels), (
            f"MODEL.REGIONSSL.LEVEL_WEIGHTS has {len(level_weights)} entries for levels {self.levels}"
        )
        self.level_weights = list(level_weights)
        self.temperature, self.shuffle_bn, self.bn_splits = temperature, shuffle_bn, bn_splits
        self.queues = KeyQueues(len(self.levels), projector.out_features, queue_size) if queue_size > 0 else None
        self._batch_negatives = None  # without a queue: negatives per query in the last step

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        r = cfg.MODEL.REGIONSSL
        args.update(
            projector=MLP(args["encoder"].out_channels, r.PROJECTOR.HIDDEN_DIM, r.PROJECTOR.OUT_DIM, r.PROJECTOR.NORM,
                          out_norm=r.PROJECTOR.OUT_NORM),
            queue_size=r.QUEUE.SIZE,
            temperature=r.TEMPERATURE,
            level_weights=cls.level_weights_from_config(cfg, args["encoder"]),
            shuffle_bn=r.SHUFFLE_BN,
            bn_splits=r.BN_SPLITS,
        )
        return args

    @classmethod
    def level_weights_from_config(cls, cfg, encoder):
        """w_l per level of the InfoNCE branch: ``LEVEL_WEIGHTS``, one per pooled level (one for
        the image-level loss of an encoder that pools whole images)."""
        r = cfg.MODEL.REGIONSSL
        if not encoder.pools_boxes:
            return per_level("MODEL.REGIONSSL.LEVEL_WEIGHTS", r.LEVEL_WEIGHTS, ["global"], "the image-level loss")
        return per_level("MODEL.REGIONSSL.LEVEL_WEIGHTS", r.LEVEL_WEIGHTS, r.IN_FEATURES)

    @staticmethod
    def embed(encoder, projector, images, boxes):
        """L2-normalised embeddings (L, R, D) of ``boxes`` (or of whole images for an encoder that
        pools images) by ``encoder`` and ``projector`` (online, or the target's)."""
        regions = encoder(images, boxes)  # (L, R, C)
        z = projector(regions.flatten(0, 1)).view(regions.shape[0], regions.shape[1], -1)
        return F.normalize(z, dim=-1)

    def key_plan(self, images, boxes):
        """The step's :class:`ShufflePlan` for the key batch (one host read), or None where no
        cross-process shuffle happens. Global methods have one key row per image (no box counts)."""
        if not self.shuffle_bn or world_size() == 1:
            return None
        rows = [len(b) for b in boxes] if self.encoder.pools_boxes else None
        return ShufflePlan.draw(images.shape[0], rows, images.device)

    def key_counts(self, images, plan):
        """Key rows of every rank (host ints) if known without an exchange, else None."""
        if plan is not None:
            return plan.rows_per_rank()
        return None if self.encoder.pools_boxes else [images.shape[0]] * world_size()

    @torch.no_grad()
    def key_embed(self, images, boxes, plan=None):
        """Momentum-encoder embeddings (L, R, D), computed on a cross-process shuffled batch.

        ``images`` may be uint8 pixels (exchanged as such, normalised after the shuffle) or a
        normalised batch; ``plan`` from :meth:`key_plan` (drawn inside if None).
        """
        levels = len(self.levels)

        def encode(im, bx):  # rows = regions, so shuffled_forward can route them back
            z = self.embed(self.target_encoder, self.momentum.projector, self.model_input(im), bx)
            return z.transpose(0, 1).reshape(z.shape[1], -1)

        if not self.encoder.pools_boxes:
            boxes = None  # one row per image
        if self.shuffle_bn:
            flat = shuffled_forward(encode, images, boxes, self.bn_splits, plan)
        else:
            flat = split_forward(encode, images, boxes, self.bn_splits)
        return flat.view(flat.shape[0], levels, -1).transpose(0, 1)

    def query_boxes(self, batched_inputs):
        """Boxes for the query per level; InsLoc overrides this for its jittered P5 box."""
        return self.view_boxes(batched_inputs, 0)

    def batch_coupling(self):
        if self.queues is None:
            return ["without a queue (QUEUE.SIZE 0) the negatives are the other keys of the (gathered) batch: "
                    "a micro-batch has k times fewer"]
        return []  # queue writes wait for the last micro-batch (regionssl.utils.micro_batch)

    def contrastive_losses(self, q, k, prefix="contrast", key_counts=None):
        """InfoNCE per level for queries q (L, R, D) and keys k (L, R, D); enqueues k.

        ``key_counts``: the key rows of every rank if known (saves a count exchange per level).
        Returns ``{f"loss_{prefix}_{level}": w_l * L_l}`` and logs accuracy, similarities,
        queue fill and embedding std per level.
        """
        losses = {}
        for l, level in enumerate(self.levels):
            if self.queues is None:  # MoCo v3: the other keys of the global batch are the negatives
                keys, key_counts = all_gather_cat(k[l].detach(), key_counts)  # (M, D), rank order
                start = sum(key_counts[: comm.get_rank()])
                own = torch.arange(start, start + k.shape[1], device=keys.device)
                loss, logits = info_nce_in_batch(q[l], keys, own, self.temperature)
                self._batch_negatives = keys.shape[0] - 1  # for learning_signals (shape: no device read)
                self.log_contrast(level, logits, q[l])
            else:
                loss, logits = info_nce(q[l], k[l], self.queues.negatives(l), self.temperature)
                self.log_contrast(level, logits, q[l], queue_fill=self.queues.fill_fraction(l))
                key_counts = self.queues.enqueue(l, k[l], key_counts)  # known after the first level
            losses[f"loss_{prefix}_{level}"] = self.level_weights[l] * loss
        self.log(num_pairs=q.shape[1], momentum=self.current_momentum())
        return losses

    @torch.no_grad()
    def log_contrast(self, level, logits, queries, **extra):
        """Log the InfoNCE diagnostics of one level.

        Args:
            logits: (R, 1 + K) with the positive in column 0, already divided by T.
            queries: (R, D) query embeddings (collapse signals ``emb_std``, ``emb_rank``).
            extra: more per-level scalars, logged as ``{name}_{level}``.
        """
        sims = logits * self.temperature
        scalars = {
            "acc": (logits.argmax(dim=1) == 0).float().mean(),
            "pos_sim": sims[:, 0].mean(),
            "neg_sim": sims[:, 1:].mean(),
            "emb_std": self.embedding_std(queries),
            "emb_rank": self.embedding_rank(queries),
            **extra,
        }
        self.log(**{f"{name}_{level}": value for name, value in scalars.items()})

    def queue_signal(self, l, level, loss):
        """:class:`LearningSignal` of the InfoNCE against queue ``l`` (logged as ``loss``); without a
        queue, against the other keys of the last step's batch (no chance level before a step)."""
        if self.queues is not None:
            k, what = self.queues.size, "queue negatives"
        else:
            k, what = self._batch_negatives, "other keys of the batch"
        return LearningSignal(
            loss, info_nce_chance(k) if k else None, f"ln(K+1), K = {k} {what}", self.level_weights[l],
            f"regionssl/emb_std_{level}", self.projector.out_features,
            f"regionssl/pos_sim_{level}", f"regionssl/neg_sim_{level}", f"regionssl/emb_rank_{level}",
        )

    def learning_signals(self):
        return [self.queue_signal(l, level, f"loss_contrast_{level}") for l, level in enumerate(self.levels)]

    def query_embed(self, images, boxes):
        """Online-encoder embeddings (L, R, D) of the query view (in ``bn_splits`` BN groups)."""
        return split_forward(lambda im, bx: self.embed(self.encoder, self.projector, im, bx), images, boxes,
                             self.bn_splits, dim=1)

    def losses(self, batched_inputs):
        q = self.query_embed(self.view_batch(batched_inputs, 0), self.query_boxes(batched_inputs))
        with torch.no_grad():
            images = self.view_uint8(batched_inputs, 1)  # uint8: shuffled as such
            boxes = self.view_boxes(batched_inputs, 1)
            plan = self.key_plan(images, boxes)
            k = self.key_embed(images, boxes, plan)
        return self.contrastive_losses(q, k, key_counts=self.key_counts(images, plan))

"""MoCo-style learning rule shared by InsLoc, MoCo-v2 and ReSim's instance branch.

Query q from the online encoder, key k from the momentum encoder (shuffle-BN), negatives from
one queue per level, loss InfoNCE with temperature T (He et al. 2020; Chen et al. 2020).
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable

from ..encoders import shuffled_forward, split_forward
from ..heads import MLP
from ..losses import info_nce
from ..queues import KeyQueues
from ..signals import LearningSignal, info_nce_chance
from .base import RegionSSLBase

__all__ = ["ContrastiveBase"]


class ContrastiveBase(RegionSSLBase):
    """InfoNCE between view-0 queries and view-1 keys on every pooled level.

    Extra args:
        projector: g, MLP from the region feature dim C to D (MoCo-v2: 2048-2048-128).
        queue_size: K negatives per level (65536).
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
        self.levels = ["global"] if self.pooler.kind == "global" else list(self.pooler.in_features)
        assert len(level_weights) == len(self.levels), (
            f"MODEL.REGIONSSL.LEVEL_WEIGHTS has {len(level_weights)} entries for levels {self.levels}"
        )
        self.level_weights = list(level_weights)
        self.temperature, self.shuffle_bn, self.bn_splits = temperature, shuffle_bn, bn_splits
        self.queues = KeyQueues(len(self.levels), projector[-1].out_features, queue_size)

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        r = cfg.MODEL.REGIONSSL
        levels = 1 if cls.is_global else len(r.IN_FEATURES)
        weights = list(r.LEVEL_WEIGHTS) if len(r.LEVEL_WEIGHTS) == levels else [1.0] * levels
        args.update(
            projector=MLP(args["feature_dim"], r.PROJECTOR.HIDDEN_DIM, r.PROJECTOR.OUT_DIM, r.PROJECTOR.NORM),
            queue_size=r.QUEUE.SIZE,
            temperature=r.TEMPERATURE,
            level_weights=weights,
            shuffle_bn=r.SHUFFLE_BN,
            bn_splits=r.BN_SPLITS,
        )
        return args

    def embed(self, net, images, boxes):
        """L2-normalised embeddings (L, R, D) of ``boxes`` (or of whole images for global methods)."""
        regions = self.pooler(net, net.backbone(images), boxes)  # (L, R, C)
        z = net.projector(regions.flatten(0, 1)).view(regions.shape[0], regions.shape[1], -1)
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def key_embed(self, images, boxes):
        """Momentum-encoder embeddings (L, R, D), computed on a cross-process shuffled batch."""
        levels = len(self.levels)

        def encode(im, bx):  # rows = regions, so shuffled_forward can route them back
            z = self.embed(self.momentum, im, bx)
            return z.transpose(0, 1).reshape(z.shape[1], -1)

        if self.shuffle_bn:
            flat = shuffled_forward(encode, images, boxes, self.bn_splits)
        else:
            flat = split_forward(encode, images, boxes, self.bn_splits)
        return flat.view(flat.shape[0], levels, -1).transpose(0, 1)

    def query_boxes(self, batched_inputs):
        """Boxes for the query per level; InsLoc overrides this for its jittered P5 box."""
        return self.view_boxes(batched_inputs, 0)

    def contrastive_losses(self, q, k, prefix="contrast"):
        """InfoNCE per level for queries q (L, R, D) and keys k (L, R, D); enqueues k.

        Returns ``{f"loss_{prefix}_{level}": w_l * L_l}`` and logs accuracy, similarities,
        queue fill and embedding std per level.
        """
        losses = {}
        for l, level in enumerate(self.levels):
            loss, logits = info_nce(q[l], k[l], self.queues.negatives(l), self.temperature)
            losses[f"loss_{prefix}_{level}"] = self.level_weights[l] * loss
            self.log_contrast(level, logits, q[l], queue_fill=self.queues.fill_fraction(l))
            self.queues.enqueue(l, k[l])
        self.log(num_pairs=q.shape[1], momentum=self.current_momentum())
        return losses

    @torch.no_grad()
    def log_contrast(self, level, logits, queries, **extra):
        """Log the InfoNCE diagnostics of one level.

        Args:
            logits: (R, 1 + K) with the positive in column 0, already divided by T.
            queries: (R, D) query embeddings (collapse signal ``emb_std``).
            extra: more per-level scalars, logged as ``{name}_{level}``.
        """
        sims = logits * self.temperature
        scalars = {
            "acc": (logits.argmax(dim=1) == 0).float().mean(),
            "pos_sim": sims[:, 0].mean(),
            "neg_sim": sims[:, 1:].mean(),
            "emb_std": self.embedding_std(queries),
            **extra,
        }
        self.log(**{f"{name}_{level}": value for name, value in scalars.items()})

    def queue_signal(self, l, level, loss):
        """:class:`LearningSignal` of the InfoNCE against queue ``l`` (logged as ``loss``)."""
        k = self.queues.size
        return LearningSignal(
            loss, info_nce_chance(k), f"ln(K+1), K = {k} queue negatives", self.level_weights[l],
            f"regionssl/emb_std_{level}", self.queues.queue.shape[1],
            f"regionssl/pos_sim_{level}", f"regionssl/neg_sim_{level}",
        )

    def learning_signals(self):
        return [self.queue_signal(l, level, f"loss_contrast_{level}") for l, level in enumerate(self.levels)]

    def query_embed(self, images, boxes):
        """Online-encoder embeddings (L, R, D) of the query view (in ``bn_splits`` BN groups)."""
        return split_forward(lambda im, bx: self.embed(self, im, bx), images, boxes, self.bn_splits, dim=1)

    def losses(self, batched_inputs):
        q = self.query_embed(self.view_batch(batched_inputs, 0), self.query_boxes(batched_inputs))
        with torch.no_grad():
            self.update_momentum()
            k = self.key_embed(self.view_batch(batched_inputs, 1), self.view_boxes(batched_inputs, 1))
        return self.contrastive_losses(q, k)

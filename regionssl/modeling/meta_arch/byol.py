"""BYOL learning rule (Grill et al. 2020; docs/methods/byol.md) shared by BYOL and SCRL.

Online network: encoder f_theta -> projector g_theta -> predictor q_theta. Target network:
f_xi -> g_xi, an exponential moving average of (f_theta, g_theta) with no gradient. Loss on
matched rows (whole views for BYOL, boxes for SCRL), symmetrised over the two views::

    l(p, z) = || p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)
    L = mean_rows[ l(q(g(f(v1))), g'(f'(v2))) + l(q(g(f(v2))), g'(f'(v1))) ]

The two directions are *summed* (L in [0, 8]), then averaged over rows: official BYOL
(``byol/byol_experiment.py`` ``loss_fn``: ``repr_loss = l(1->2) + l(2->1); jnp.mean``) and
SCRL (``trainer/base.py`` ``_criterion``: ``loss = l12; loss += l21; loss.mean()``) agree.
"""
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads import MLP
from ..losses import byol_regression
from ..signals import LearningSignal
from .base import RegionSSLBase

__all__ = ["BYOLBase", "BYOL"]

logger = logging.getLogger(__name__)


class BYOLBase(RegionSSLBase):
    """Online encoder + projector g + predictor q, EMA target (f_xi, g_xi); 2 - 2cos regression.

    Extra args:
        projector: g, ``MLP(C, 4096, 256, BN, last_bias=False)`` (Linear+BN+ReLU+Linear, no bias
            in the last layer, as BYOL's ``networks.MLP`` and SCRL's ``TwoLayerLinearHead``).
        predictor: q, ``MLP(256, 4096, 256, BN, last_bias=False)``.

    Both views go through each network in **one** batch of 2N images (view 0 first), so the
    BatchNorms see both views together: SCRL's ``_forward`` concatenates the views (also for its
    BYOL baseline, whose COCO numbers SCRL's README reports); official JAX BYOL instead calls the
    network once per view. One batch also keeps >= 2 rows in the heads' BatchNorm1d whenever
    there is at least one pair.

    Target initialisation: the target (``momentum.*``) is a copy of the online encoder and
    projector, made by ``build_momentum("projector")``. Neither official code does this: SCRL's
    ``trainer/trainer.py`` calls ``_initialize_target_network(from_online=False)`` (docs/methods/scrl.md),
    and official BYOL's ``_make_initial_state`` draws target parameters from a different RNG key
    (its comment: no significant difference with the same key). We copy, as MoCo, InsLoc, ReSim,
    PixPro and SoCo do: the target is then the EMA of the online network from step 0 instead of
    carrying a random component that decays only as tau^k (~0.05 after 100 steps at tau=0.97,
    after ~750 steps at 0.996).

    EMA: ``xi <- tau xi + (1 - tau) theta`` with ``tau_k = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2``
    (``MODEL.REGIONSSL.MOMENTUM``: SCHEDULE "cosine", BASE tau_0; K = SOLVER.MAX_ITER), after
    optimizer step k with tau_k, as both official codes order it (:meth:`RegionSSLBase.after_step`,
    called by the trainer's hook; tau_k is a function of the global iteration, so resume is exact).

    Diagnostics (``regionssl/...``): ``pos_sim`` mean cos(prediction, target projection) over both
    directions, ``emb_std`` std of the normalised online projections (-> 0 on collapse; ~1/sqrt(256)
    when spread), ``num_pairs`` matched rows R, ``momentum`` tau_k, applied after step k.
    """

    loss_name = "byol"

    @configurable
    def __init__(self, *, projector, predictor, **kwargs):
        super().__init__(**kwargs)
        self.projector = projector
        self.predictor = predictor
        self.build_momentum("projector")  # momentum.backbone (+ momentum.roi_heads), momentum.projector

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        r = cfg.MODEL.REGIONSSL
        out, norm = r.PROJECTOR.OUT_DIM, r.PROJECTOR.NORM
        args.update(
            projector=MLP(args["encoder"].out_channels, r.PROJECTOR.HIDDEN_DIM, out, norm, last_bias=False),
            predictor=MLP(out, r.PREDICTOR.HIDDEN_DIM, out, norm, last_bias=False),
        )
        return args

    # ---------------------------------------------------------------- pieces
    def pair_inputs(self, batched_inputs):
        """Both views as one batch and the boxes to pool in it.

        Returns:
            images: (2N, 3, H, W), view 0 of every input, then view 1.
            boxes: list of 2N (R_i, 4) valid boxes in view pixels, same order; row j of image i
                and of image N + i is the same region (ignored by global methods).
        """
        images = torch.cat([self.view_batch(batched_inputs, 0), self.view_batch(batched_inputs, 1)])
        boxes = self.view_boxes(batched_inputs, 0) + self.view_boxes(batched_inputs, 1)
        return images, boxes

    def online_and_target(self, images, boxes):
        """Both networks on the rows of ``images`` (2N) and ``boxes`` (2N lists).

        Returns:
            z: (2R, D) online projections g(f(.)); rows 0..R-1 come from view 0, R..2R-1 from view 1.
            p: (2R, D) online predictions q(z).
            z_t: (2R, D) target projections g'(f'(.)), no gradient.
            maps: the online and the target encoder's feature maps ({name: (2N, C, h, w)} each).
        """
        features = self.encoder.features(images)
        z = self.projector(self.encoder.pool(features, boxes)[0])  # (2R, D)
        p = self.predictor(z)
        with torch.no_grad():
            t_features = self.target_encoder.features(images)
            z_t = self.momentum.projector(self.target_encoder.pool(t_features, boxes)[0])
        return z, p, z_t, (features, t_features)

    def symmetric_regression(self, p1, p2, z1, z2):
        """L = mean_i[ l(p1_i, z2_i) + l(p2_i, z1_i) ], l = 2 - 2 cos (fp32).

        Args:
            p1, p2: (R, D) online predictions q(g(f(v1))), q(g(f(v2))).
            z1, z2: (R, D) target projections g'(f'(v1)), g'(f'(v2)); treated as constants.
        Returns:
            scalar loss; logs ``pos_sim`` = mean cosine of the 2R (prediction, target) pairs.
        """
        loss = byol_regression(p1, z2) + byol_regression(p2, z1)  # each a mean over R rows
        self.log(pos_sim=1.0 - loss.detach() / 4.0)  # l = 2 - 2cos -> mean cos = 1 - L / 4
        return loss

    def byol_losses(self, images, boxes):
        """``{"loss_<name>": L}`` for rows pooled from ``images`` (2N) with ``boxes`` (2N lists), and
        the online and target feature maps (for losses on top of BYOL's, CVSA's)."""
        rows = sum(len(b) for b in boxes) if self.encoder.pools_boxes else images.shape[0]
        # A process without any pair still runs every network on its 0 rows: their synchronised
        # BatchNorms (SyncBN, naiveSyncBN) are collectives the other processes wait in, and DDP
        # expects a gradient (here zero) for every parameter. Only hand-made inputs get here today:
        # the mapper re-draws or skips pairs without a box.
        z, p, z_t, maps = self.online_and_target(images, boxes)
        r = z.shape[0] // 2
        if rows == 0:
            logger.warning(f"{type(self).__name__}: batch without any region pair, loss set to 0")
            loss = p.sum() * 0.0  # zero, in the graph of every online parameter
        else:
            loss = self.symmetric_regression(p[:r], p[r:], z_t[:r], z_t[r:])
            with torch.no_grad():
                self.log(emb_std=self.embedding_std(z), emb_rank=self.embedding_rank(z))
        self.log(num_pairs=r, momentum=self.current_momentum())
        return {f"loss_{self.loss_name}": loss}, maps

    def learning_signals(self):
        """The regression has no chance level: the guard watches the projections' spread (a
        collapsed target is predicted perfectly, so ``pos_sim`` -> 1 while ``emb_std`` -> 0)."""
        dim = self.projector[-1].out_features
        return [LearningSignal(f"loss_{self.loss_name}", emb_std="regionssl/emb_std", dim=dim,
                               pos_sim="regionssl/pos_sim", emb_rank="regionssl/emb_rank")]

    def losses(self, batched_inputs):
        return self.byol_losses(*self.pair_inputs(batched_inputs))[0]


@META_ARCH_REGISTRY.register()
class BYOL(BYOLBase):
    """BYOL (global): average-pooled res5 of each whole view -> g -> q; rows are images.

    Views ``TwoCrops`` + ``WholeView`` with BYOL's asymmetric photometric recipe (configs/byol.yaml).
    """

    is_global = True

"""CVSA — Cross-view Saliency Alignment (Wu, Li, Zang, Li; BMVC'21, arXiv 2106.15788).

No official code exists (docs/methods/cvsa.md); this file is the reference implementation. What
follows the paper and what is ours is listed in ``docs/methods/cvsa.md``. In short:

* stage 1 is plain BYOL (``configs/byol.yaml``); stage 2 (this model) starts from that checkpoint
  (``MODEL.WEIGHTS``) and trains on ``SaliencySwap`` views (``regionssl/data/saliency.py``);
* loss ``L = L_BYOL + lambda * L_align`` (``loss_byol``, ``loss_align``; lambda =
  ``MODEL.REGIONSSL.CVSA.ALIGN_WEIGHT``). L_BYOL is :class:`BYOLBase`'s global regression.
* L_align: 1x1-conv projector g_c (online and EMA target) on the res5 maps of both views, 1x1-conv
  predictor q_c on the query side. For a query map Q = q_c(g_c(f(v))) (online) and a key map
  K = g_c'(f'(v')) (target) of the other view, :func:`cross_view_attention` gives
  a^q (how much each query position is attended by the key view) and a^k (how much each key
  position is attended by the query view), softmax over positions of cos / T
  (``CVSA.TEMPERATURE``). Each is matched to its view's saliency mask, area-averaged to the res5
  grid and normalised to sum 1, with KL(m || a) (:func:`saliency_alignment`), minimal iff a = m::

      L_align = sum_{(v, v') in {(1, 2), (2, 1)}} [ KL(m_v || a^q) + KL(m_v' || a^k) ] / 2

  The two directions are summed like BYOL's (:class:`BYOLBase`).
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...utils.distributed import to_device
from ..losses import cross_view_attention, saliency_alignment
from .byol import BYOLBase

__all__ = ["ConvMLP", "CVSA"]


class ConvMLP(nn.Sequential):
    """Per-position MLP on a feature map: ``Conv1x1(in, hidden) -> norm -> ReLU -> Conv1x1(hidden, out)``.

    The BYOL projector/predictor (:class:`~regionssl.modeling.heads.MLP`) applied at every
    position, as PixPro's ``MLP2d``: (N, in, H, W) -> (N, out, H, W). ``norm`` is a Detectron2
    norm name ("", "BN", "SyncBN", "naiveSyncBN"); as BYOL's MLP, only the last conv has no bias.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, norm="BN"):
        layers = [nn.Conv2d(in_dim, hidden_dim, 1)]
        if norm:
            layers.append(get_norm(norm, hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1, bias=False)]
        super().__init__(*layers)


@META_ARCH_REGISTRY.register()
class CVSA(BYOLBase):
    """BYOL + cross-view saliency alignment on res5 (see the module docstring).

    Extra args:
        conv_projector: g_c, ``ConvMLP(2048, PROJECTOR.HIDDEN_DIM, CVSA.CONV_DIM)``; EMA copy in
            ``momentum.conv_projector``.
        conv_predictor: q_c, ``ConvMLP(CONV_DIM, PREDICTOR.HIDDEN_DIM, CONV_DIM)``.
        align_weight: lambda (``CVSA.ALIGN_WEIGHT``).
        align_temperature: T of the attention softmax (``CVSA.TEMPERATURE``).

    Inputs need ``"masks"`` (the ``SaliencySwap`` view generator makes them).
    Diagnostics: BYOL's, plus ``align_pairs`` (maps with a non-empty mask) and ``attn_on_mask``
    (attention mass on positions where the mask is > 0; rises as the model localises the swapped
    salient region).
    """

    is_global = True

    @configurable
    def __init__(self, *, conv_projector, conv_predictor, align_weight, align_temperature, **kwargs):
        super().__init__(**kwargs)
        self.conv_projector = conv_projector
        self.conv_predictor = conv_predictor
        self.align_weight, self.align_temperature = align_weight, align_temperature
        # re-made with the conv projector; same names as BYOL's target + momentum.conv_projector
        self.build_momentum("projector", "conv_projector")

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        r = cfg.MODEL.REGIONSSL
        dim, norm = r.CVSA.CONV_DIM, r.PROJECTOR.NORM
        args.update(
            conv_projector=ConvMLP(args["feature_dim"], r.PROJECTOR.HIDDEN_DIM, dim, norm),
            conv_predictor=ConvMLP(dim, r.PREDICTOR.HIDDEN_DIM, dim, norm),
            align_weight=r.CVSA.ALIGN_WEIGHT,
            align_temperature=r.CVSA.TEMPERATURE,
        )
        return args

    def view_masks(self, batched_inputs):
        """Saliency masks of view 0 of every input, then view 1: (2N, 1, H, W)."""
        if any("masks" not in d for d in batched_inputs):
            raise ValueError(
                "CVSA needs saliency masks in its inputs: set INPUT.REGIONSSL.VIEW_GENERATOR 'SaliencySwap'"
            )
        masks = [torch.stack([d["masks"][v] for d in batched_inputs]) for v in (0, 1)]
        return to_device(torch.cat(masks), self.device).float()[:, None]  # one non-blocking copy

    @staticmethod
    def mask_targets(masks, size):
        """(2N, 1, H, W) masks area-averaged to the res5 grid ``size`` = (h, w): (2N, h*w)."""
        return F.adaptive_avg_pool2d(masks, size).flatten(1)

    def alignment_loss(self, q, k, masks):
        """L_align for query maps q (2N, D, h, w), key maps k (2N, D, h, w), masks (2N, h*w).

        Row i < N is view 0 of image i, row N + i its view 1.
        """
        n = q.shape[0] // 2
        total, valid_maps, on_mask = 0.0, 0.0, 0.0
        for qs, ks in ((slice(0, n), slice(n, 2 * n)), (slice(n, 2 * n), slice(0, n))):
            a_q, a_k = cross_view_attention(q[qs], k[ks], self.align_temperature)
            l_q, v_q = saliency_alignment(a_q, masks[qs])
            l_k, v_k = saliency_alignment(a_k, masks[ks])
            total = total + (l_q + l_k) / 2
            with torch.no_grad():  # tensors: read with the step's other scalars, no sync here
                for a, m, v in ((a_q, masks[qs], v_q), (a_k, masks[ks], v_k)):
                    valid_maps = valid_maps + v.float().sum()
                    on_mask = on_mask + ((a * (m > 0)).sum(1) * v).sum()
        self.log(align_pairs=valid_maps, attn_on_mask=on_mask / valid_maps.clamp(min=1))
        return total

    def losses(self, batched_inputs):
        masks = self.view_masks(batched_inputs)  # (2N, 1, H, W), same order as the images
        images, boxes = self.pair_inputs(batched_inputs)  # (2N, 3, H, W): view 0 of every image, then view 1
        with torch.no_grad():
            self.step_target()
        n = images.shape[0] // 2
        features = self.backbone(images)
        z = self.projector(self.pooler(self, features, boxes)[0])  # (2N, D) global projections
        p = self.predictor(z)
        q = self.conv_predictor(self.conv_projector(features["res5"]))  # (2N, D_c, h, w)
        with torch.no_grad():
            t_features = self.momentum.backbone(images)
            z_t = self.momentum.projector(self.pooler(self.momentum, t_features, boxes)[0])
            k = self.momentum.conv_projector(t_features["res5"])  # (2N, D_c, h, w)
        loss_byol = self.symmetric_regression(p[:n], p[n:], z_t[:n], z_t[n:])
        loss_align = self.alignment_loss(q, k, self.mask_targets(masks, q.shape[-2:]))
        with torch.no_grad():
            self.log(emb_std=self.embedding_std(z), num_pairs=n, momentum=self.current_momentum())
        return {"loss_byol": loss_byol, "loss_align": self.align_weight * loss_align}

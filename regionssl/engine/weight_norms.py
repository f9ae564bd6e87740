"""How far pretraining has moved the scale of the detector's convolution weights.

A convolution followed by a normalisation layer computes the same function at any scale of its
weight w, but a gradient step changes its direction by about ``lr / |w|^2``. A stage whose weights
have grown k times during pretraining therefore fine-tunes with an effective learning rate about
k^2 times smaller than a freshly initialised one: a detector started from it barely adapts that
stage, and can end below random initialisation. :class:`WeightNormMonitor` logs, per stage, the
norm of the online encoder's conv weights divided by the norm the same stage has at random
initialisation (``regionssl/weight_norm/<stage>``); :class:`~regionssl.engine.hooks.CollapseGuard`
warns when one exceeds ``TEST.REGIONSSL.GUARD.MAX_WEIGHT_NORM_GROWTH``.

Stages are named as in the detector: ``stem``, ``res2``-``res5`` (C4 models keep res5 in
``roi_heads.res5``), ``fpn`` (every lateral and output conv) and ``box_head`` where the model
pretrains one. Momentum copies and heads have other prefixes and are not counted.
"""
import re
from collections import OrderedDict

import torch
from torch import nn
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["WEIGHT_NORM_PREFIX", "stage_of", "stage_conv_weights", "stage_norms", "WeightNormMonitor"]

WEIGHT_NORM_PREFIX = "regionssl/weight_norm/"
_DETECTOR_PREFIXES = ("backbone.", "roi_heads.")
_STAGE = re.compile(r"(?:^|\.)(stem|res[2-5])(?:\.|$)")


def stage_of(module_name):
    """The detector stage a conv module belongs to, or None (not a detector module).

    >>> stage_of("backbone.bottom_up.res3.0.conv2"), stage_of("roi_heads.res5.1.conv1")
    ('res3', 'res5')
    >>> stage_of("backbone.fpn_lateral4"), stage_of("roi_heads.box_head.conv1"), stage_of("momentum.backbone.stem.conv1")
    ('fpn', 'box_head', None)
    """
    if not module_name.startswith(_DETECTOR_PREFIXES):
        return None
    if re.search(r"(?:^|\.)fpn_(lateral|output)\d", module_name):
        return "fpn"
    if module_name.startswith("roi_heads.box_head."):
        return "box_head"
    match = _STAGE.search(module_name)
    return match.group(1) if match else None


def stage_conv_weights(model):
    """{stage: [conv weight parameters]} of the detector modules of ``model``, stages in model order."""
    stages = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            stage = stage_of(name)
            if stage is not None:
                stages.setdefault(stage, []).append(module.weight)
    return stages


@torch.no_grad()
def stage_norms(stages):
    """{stage: sqrt(sum of squares of every weight of the stage)} as floats (one device read)."""
    names = list(stages)
    if not names:
        return {}
    squares = torch.stack([sum(w.detach().float().pow(2).sum() for w in stages[s]) for s in names])
    return dict(zip(names, squares.sqrt().cpu().tolist()))


class WeightNormMonitor(HookBase):
    """Every ``period`` iterations (and after the last), put each stage's conv weight norm relative
    to random initialisation into the EventStorage as ``regionssl/weight_norm/<stage>``.

    The reference norms are read when the hook is built, i.e. from the freshly initialised model
    before the trainer loads any weights or resumes: a resumed run measures against the same
    reference (up to the seed's draw, ~0.1 % for a ResNet stage), and a run started from pretrained
    ``MODEL.WEIGHTS`` is measured against random initialisation too, which is what a detector's
    fine-tuning schedule assumes.
    """

    def __init__(self, model, period):
        self.period = max(int(period), 1)
        self._stages = stage_conv_weights(getattr(model, "module", model))
        self.initial = stage_norms(self._stages)  # {stage: norm at random initialisation}

    def ratios(self):
        """{stage: current norm / norm at random initialisation}."""
        current = stage_norms(self._stages)
        return {s: current[s] / self.initial[s] for s in current if self.initial[s] > 0}

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period and it + 1 != self.trainer.max_iter:
            return
        if not comm.is_main_process() or not self._stages:
            return
        storage = get_event_storage()
        for stage, ratio in self.ratios().items():
            storage.put_scalar(WEIGHT_NORM_PREFIX + stage, ratio, smoothing_hint=False)

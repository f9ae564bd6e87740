"""The target (momentum) network: EMA coefficient schedule and update.

* :func:`momentum_at` gives the EMA coefficient as a function of the global iteration, so it
  resumes exactly;
* :func:`make_momentum_copy` makes the target, a frozen deep copy of online modules (the target is
  initialised from the online network);
* :func:`ema_update` is ``xi <- m xi + (1 - m) theta``, called once after every optimizer step.
"""
import copy
import math

import torch
from torch import nn

__all__ = ["momentum_at", "make_momentum_copy", "ema_update"]


def momentum_at(iteration, max_iter, base, schedule):
    """EMA coefficient at global iteration k.

    "constant": ``m = base`` (MoCo/InsLoc/ReSim: 0.999).
    "cosine":   ``tau_k = 1 - (1 - tau_0) * (cos(pi k / K) + 1) / 2`` (BYOL/SCRL), tau_K = 1.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        k = min(max(iteration, 0), max_iter)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(max_iter, 1)) + 1.0) / 2.0
    raise ValueError(f"Unknown MODEL.REGIONSSL.MOMENTUM.SCHEDULE {schedule!r}")


def make_momentum_copy(modules):
    """``nn.ModuleDict`` of frozen deep copies of ``{name: module}`` (None entries are left out)."""
    target = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items() if m is not None})
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online, target, m):
    """``xi <- m * xi + (1 - m) * theta`` for parameters of matching entries of two name->module maps.

    Buffers (BN running statistics) are not averaged: the target keeps its own, as in MoCo/BYOL.
    m = 0 copies the online weights, m = 1 freezes the target.
    """
    for name, t_mod in target.items():
        t_params = list(t_mod.parameters())
        o_params = list(online[name].parameters())
        assert len(t_params) == len(o_params), name
        if not t_params:
            continue
        # one fused pass, xi + (1 - m)(theta - xi); exact at both ends (m = 0 gives theta, m = 1 xi)
        torch._foreach_lerp_(t_params, [p.detach() for p in o_params], 1.0 - m)

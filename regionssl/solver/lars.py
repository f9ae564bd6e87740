"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks") for BYOL-style runs.

SCRL (kakaobrain/scrl ``optim/optim.py``: torchlars ``LARS`` around ``torch.optim.SGD``) and SwAV
(facebookresearch/swav ``main_swav.py``: apex ``LARC(clip=False)`` around SGD) use the same rule,
implemented here as one ``torch.optim.Optimizer`` (docs/methods/scrl.md, docs/methods/swav.md). For a
parameter w with gradient g, in a group with learning rate lr, momentum m, weight decay wd and
coefficient eta::

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0, else 1
    d     = trust * (g + wd * w)          # weight decay joins the gradient before momentum
    buf   = m * buf + d                   # (buf = d at the first step, like torch SGD)
    w     = w - lr * buf

Parameters in a group with ``lars_exclude=True`` (biases and normalisation layers) get plain SGD
with momentum: no trust ratio *and* no weight decay, whatever the group's ``weight_decay``.

SCRL's ``CustomLARS`` has a quirk, reproduced when an excluded group sets ``grad_times_lr=True``
(``SOLVER.REGIONSSL.LARS_EXCLUDED_GRAD_TIMES_LR``): it multiplies the excluded gradient by the
group's lr (where LARS would multiply by the trust ratio) and the wrapped SGD multiplies by lr
again: ``d = lr * g``, then ``w -= lr * buf``, so a first step moves by lr^2 * g (207 g at the
peak lr 14.4 of SCRL's batch-8192 recipe, instead of 14.4 g).

Official BYOL (``byol/utils/optimizers.py``, docs/methods/byol.md) differs slightly: its denominator is
``||g + wd * w||`` (the norm of the decayed gradient) instead of ``||g|| + wd * ||w||``; the two
agree when g and w are parallel and BYOL's trust ratio is never smaller otherwise.
"""
import re

import torch
from torch import nn

__all__ = ["LARS", "build_lars_param_groups"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (torchlars / apex-LARC convention).

    Args:
        params: iterable of parameters or param-group dicts; a group may set ``lars_exclude``.
        lr (float): learning rate (BYOL/SCRL: base_lr * B / 256, scheduled by Detectron2).
        momentum (float): momentum m (0.9 in BYOL, SCRL, SwAV).
        weight_decay (float): wd, added to the gradient of non-excluded parameters.
        eta (float): trust coefficient (1e-3 in BYOL, SCRL, SwAV).
        eps (float): added to the trust-ratio denominator (1e-8 as in torchlars and LARC).
        lars_exclude (bool): default for groups that do not set it.
        grad_times_lr (bool): SCRL's quirk for excluded groups (see the module docstring);
            default for groups that do not set it. No effect on LARS-adapted groups.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=1e-3, eps=1e-8,
                 lars_exclude=False, grad_times_lr=False):
        assert lr >= 0 and momentum >= 0 and weight_decay >= 0 and eta > 0
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        lars_exclude=lars_exclude, grad_times_lr=grad_times_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, eps = group["weight_decay"], group["eta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    # Norms in at least fp32 (params may be half); torch.where avoids a GPU sync.
                    acc = torch.promote_types(p.dtype, torch.float32)
                    w_norm = torch.linalg.vector_norm(p, dtype=acc)
                    g_norm = torch.linalg.vector_norm(d, dtype=acc)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        eta * w_norm / (g_norm + wd * w_norm + eps),
                        torch.ones_like(w_norm),
                    )
                    d = d.add(p, alpha=wd).mul_(trust.to(p.dtype))
                elif group["grad_times_lr"]:
                    d = d.mul(group["lr"])  # SCRL CustomLARS: lr in place of the trust ratio
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _norm_module_types():
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.layers.batch_norm import CycleBatchNormList, LayerNorm as D2LayerNorm

    # _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, detectron2's NaiveSyncBatchNorm (a
    # BatchNorm2d), InstanceNorm* and the lazy variants.
    types = [nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
             FrozenBatchNorm2d, D2LayerNorm, CycleBatchNormList]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    return tuple(types)


def build_lars_param_groups(model, base_lr, weight_decay, exclude_bias_and_norm=True, exclude_names="",
                            grad_times_lr=False):
    """Split ``model``'s trainable parameters into a LARS group and an excluded group.

    Excluded (``lars_exclude=True``, ``weight_decay=0``), by default: every parameter of a
    normalisation module (torch BatchNorm/SyncBatchNorm/InstanceNorm/GroupNorm/LayerNorm, detectron2
    NaiveSyncBatchNorm/LayerNorm/CycleBatchNormList; FrozenBatchNorm2d has buffers only) and every
    parameter registered under the name ``bias`` on its module (DeepMind BYOL's rule). The decision
    is by module type, not by a substring of the parameter's name.

    ``exclude_names`` replaces that rule by a regular expression on the full parameter name
    (``re.search``). SCRL's rule (``"bn" in name or "bias" in name`` on torchvision names inside an
    ``nn.Sequential``) excludes every bias and the BN weights of the residual blocks, but not the
    weights of the stem BN, the downsample BNs and the heads' BN; on Detectron2's names that is
    ``configs/scrl.yaml``'s ``\\.bias$|\\.res[2-5]\\.\\d+\\.conv[1-3]\\.norm\\.weight$`` (tests/solver/test_lars.py
    checks it against SCRL's rule on a torchvision ResNet-50).

    Args:
        model (nn.Module): the model to optimise.
        base_lr (float): initial ``lr`` of both groups (the scheduler scales it).
        weight_decay (float): wd of the LARS group.
        exclude_bias_and_norm (bool): False puts everything into the LARS group.
        exclude_names (str): regular expression selecting the excluded parameters by name ("" = by type).
        grad_times_lr (bool): the excluded group gets SCRL's lr-squared quirk (see :class:`LARS`).

    Returns:
        list[dict]: non-empty param groups with keys ``params``, ``lr``, ``weight_decay``,
        ``lars_exclude`` (and ``grad_times_lr``), ready for :class:`LARS` (or Detectron2's scheduler).
    """
    norm_types = _norm_module_types()
    pattern = re.compile(exclude_names) if exclude_names else None
    adapted, excluded, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)  # shared parameters are listed once, under their first module
            if pattern is not None:
                is_excluded = pattern.search(f"{module_name}.{name}" if module_name else name) is not None
            else:
                is_excluded = isinstance(module, norm_types) or name == "bias"
            (excluded if exclude_bias_and_norm and is_excluded else adapted).append(param)
    groups = [
        {"params": adapted, "lr": base_lr, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "lr": base_lr, "weight_decay": 0.0, "lars_exclude": True, "grad_times_lr": grad_times_lr},
    ]
    return [g for g in groups if g["params"]]

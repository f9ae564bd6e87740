"""Tests for the LARS optimizer and its parameter grouping (regionssl/solver/lars.py)."""
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock
from regionssl.solver import LARS, build_lars_param_groups

ETA, WD, LR, M = 0.5, 0.1, 0.1, 0.9


def _run_two_steps(params_and_grads, groups):
    opt = LARS(groups, lr=LR, momentum=M, weight_decay=WD, eta=ETA, eps=0.0)
    for step in range(2):
        for p, grads in params_and_grads:
            p.grad = grads[step].clone()
        opt.step()


def test_two_steps_by_hand():
    # eta = 0.5, wd = 0.1, lr = 0.1, momentum 0.9, eps = 0.
    # w1 = [3, 4] (|w| = 5), g = [0.3, 0.4] (|g| = 0.5) at both steps.
    #   step 1: trust = 0.5*5 / (0.5 + 0.1*5) = 2.5;  d = 2.5*([0.3,0.4] + 0.1*[3,4]) = [1.5, 2.0]
    #           buf = [1.5, 2.0];  w1 = [3, 4] - 0.1*buf = [2.85, 3.8]  (|w| = 4.75)
    #   step 2: trust = 0.5*4.75 / (0.5 + 0.475) = 2.375/0.975;  g + wd*w = [0.585, 0.78]
    #           d = [1.425, 1.9];  buf = 0.9*[1.5, 2.0] + d = [2.775, 3.7]
    #           w1 = [2.85 - 0.2775, 3.8 - 0.37] = [2.5725, 3.43]
    # w2 = [1, 0], g = [0, 2] (|g| = 2; not parallel to w, so the wd term matters):
    #   step 1: trust = 0.5*1 / (2 + 0.1) = 5/21;  d = 5/21*[0.1, 2] = [0.0238095, 0.4761905]
    #           buf = d;  w2 = [1 - 0.00238095, -0.04761905] = [0.9976190, -0.0476190]
    #   step 2: |w2| = sqrt(0.9976190^2 + 0.0476190^2) = 0.9987549
    #           trust = 0.5*0.9987549 / (2 + 0.09987549) = 0.2378129
    #           d = 0.2378129*[0.0997619, 2 - 0.0047619] = [0.0237247, 0.4744933]
    #           buf = 0.9*[0.0238095, 0.4761905] + d = [0.0451532, 0.9030648]
    #           w2 = [0.9976190 - 0.0045153, -0.0476190 - 0.0903065] = [0.9931037, -0.1379255]
    # b (excluded, group wd = 0.1 is ignored), g = 0.5 at both steps: plain SGD with momentum.
    #   step 1: buf = 0.5, b = 1 - 0.05 = 0.95;  step 2: buf = 0.45 + 0.5 = 0.95, b = 0.855
    w1 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w2 = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    g1 = torch.tensor([0.3, 0.4], dtype=torch.float64)
    g2 = torch.tensor([0.0, 2.0], dtype=torch.float64)
    gb = torch.tensor([0.5], dtype=torch.float64)
    groups = [{"params": [w1, w2]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.1}]
    _run_two_steps([(w1, [g1, g1]), (w2, [g2, g2]), (b, [gb, gb])], groups)
    torch.testing.assert_close(w1.detach(), torch.tensor([2.5725, 3.43], dtype=torch.float64))
    torch.testing.assert_close(
        w2.detach(), torch.tensor([0.9931037, -0.1379255], dtype=torch.float64), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(b.detach(), torch.tensor([0.855], dtype=torch.float64))


def test_excluded_equals_torch_sgd_without_wd():
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3, generator=gen))
    w_ref = nn.Parameter(w.detach().clone())
    opt = LARS([{"params": [w], "lars_exclude": True}], lr=0.3, momentum=0.9, weight_decay=0.5)
    ref = torch.optim.SGD([w_ref], lr=0.3, momentum=0.9, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(5, 3, generator=gen)
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(w, w_ref)


def test_zero_norm_gives_trust_one():
    # |w| = 0: trust 1, d = g + wd*0 = g. |g| = 0 with wd > 0: trust 1, d = wd*w.
    w0 = nn.Parameter(torch.zeros(2))
    w1 = nn.Parameter(torch.tensor([2.0, 0.0]))
    opt = LARS([w0, w1], lr=1.0, momentum=0.9, weight_decay=0.1, eta=1e-3)
    w0.grad = torch.tensor([1.0, -1.0])
    w1.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(w0.detach(), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(w1.detach(), torch.tensor([1.8, 0.0]))


def _excluded_ids(groups):
    ex = [g for g in groups if g["lars_exclude"]]
    assert all(g["weight_decay"] == 0.0 for g in ex)
    return {id(p) for g in ex for p in g["params"]}


def test_grouping_small_conv_bn_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
        nn.GroupNorm(2, 8), nn.Flatten(), nn.LazyLinear(4), nn.LayerNorm(4),
    )
    model(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    groups = build_lars_param_groups(model, base_lr=0.2, weight_decay=1.5e-6)
    excluded = _excluded_ids(groups)
    expect = {id(p) for m in (model[1], model[4], model[7]) for p in m.parameters()}
    expect |= {id(model[0].bias), id(model[6].bias)}
    assert excluded == expect
    adapted = [g for g in groups if not g["lars_exclude"]]
    assert len(adapted) == 1 and adapted[0]["weight_decay"] == 1.5e-6 and adapted[0]["lr"] == 0.2
    assert {id(p) for p in adapted[0]["params"]} == {
        id(model[0].weight), id(model[3].weight), id(model[6].weight)
    }
    # Every trainable parameter appears exactly once.
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # Without exclusion: a single adapted group.
    flat = build_lars_param_groups(model, 0.2, 1e-6, exclude_bias_and_norm=False)
    assert len(flat) == 1 and not flat[0]["lars_exclude"]


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "naiveSyncBN", "GN"])
def test_grouping_detectron2_resnet_blocks(norm):
    stem = BasicStem(3, 64, norm=norm)
    block = BottleneckBlock(64, 256, bottleneck_channels=64, stride=2, norm=norm)  # has shortcut
    model = nn.Sequential(stem, block)
    groups = build_lars_param_groups(model, 0.1, 1e-6)
    excluded = _excluded_ids(groups)
    norms = [m for m in model.modules() if m.__class__.__name__ in
             ("BatchNorm2d", "SyncBatchNorm", "NaiveSyncBatchNorm", "GroupNorm")]
    assert len(norms) == 5  # stem + conv1..3 + shortcut
    if norm == "naiveSyncBN":
        assert any(isinstance(m, NaiveSyncBatchNorm) for m in norms)
    assert excluded == {id(p) for m in norms for p in m.parameters()}
    # Detectron2 convs followed by a norm have no bias: every conv weight is adapted.
    adapted = {id(p) for g in groups if not g["lars_exclude"] for p in g["params"]}
    convs = [stem.conv1, block.conv1, block.conv2, block.conv3, block.shortcut]
    assert adapted == {id(c.weight) for c in convs}


def test_grouping_frozen_bn_has_no_params():
    stem = BasicStem(3, 64, norm="FrozenBN")
    assert isinstance(stem.conv1.norm, FrozenBatchNorm2d)
    groups = build_lars_param_groups(stem, 0.1, 1e-6)
    assert len(groups) == 1 and groups[0]["params"] == [stem.conv1.weight]
    stem.freeze()  # requires_grad False -> nothing to optimise
    assert build_lars_param_groups(stem, 0.1, 1e-6) == []


def test_grouping_catches_torchvision_downsample_bn():
    # SCRL's name rule ("bn" in name or "bias" in name) misses layerX.0.downsample.1.*.
    model = resnet18()
    groups = build_lars_param_groups(model, 0.1, 1e-6)
    excluded = _excluded_ids(groups)
    ds_bn = model.layer2[0].downsample[1]
    assert isinstance(ds_bn, nn.BatchNorm2d)
    assert id(ds_bn.weight) in excluded and id(ds_bn.bias) in excluded
    name_rule = {n for n, _ in model.named_parameters() if "bn" in n or "bias" in n}
    assert "layer2.0.downsample.1.weight" not in name_rule
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters()}
    assert excluded == bn_params | {id(model.fc.bias)}


def test_optimizer_runs_on_model_groups():
    """One LARS step on the groups built from a real model moves every parameter by exactly the
    rule of its group (checked against the formula, not against a zero/non-zero pattern: a
    Linear bias in front of a BatchNorm has a float-noise gradient whose step may round away)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    lr, wd, eta = 0.5, 1e-4, 1e-3
    groups = build_lars_param_groups(model, lr, wd)
    opt = LARS(groups, lr=lr, eta=eta, eps=0.0)
    before = {id(p): p.detach().clone().double() for p in model.parameters()}
    model(torch.randn(16, 4)).pow(2).mean().backward()
    grads = {id(p): p.grad.detach().clone().double() for p in model.parameters()}
    excluded = {id(p) for g in groups if g["lars_exclude"] for p in g["params"]}
    opt.step()
    for p in model.parameters():
        w, g = before[id(p)], grads[id(p)]
        if id(p) in excluded:  # plain SGD step, no weight decay
            expected = w - lr * g
        else:
            trust = eta * w.norm() / (g.norm() + wd * w.norm())
            expected = w - lr * trust * (g + wd * w)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
    # the weights of both Linear layers (real gradients) did move
    assert not torch.equal(before[id(model[0].weight)].float(), model[0].weight.detach())
    assert not torch.equal(before[id(model[3].weight)].float(), model[3].weight.detach())
    sd = opt.state_dict()
    assert sd["param_groups"][1]["lars_exclude"] is True


# ----------------------------------------------------------------------------- SCRL's CustomLARS
def test_scrl_excluded_step_is_lr_squared_by_hand():
    """SCRL's quirk (kakaobrain/scrl optim/optim.py): the excluded gradient is multiplied by lr,
    then SGD multiplies by lr again. b = 1, g = 0.5, momentum 0.9, lr 0.1 then 0.2:
    step 1: d = 0.1 * 0.5 = 0.05, buf = 0.05, b = 1 - 0.1 * 0.05 = 0.995;
    step 2: d = 0.2 * 0.5 = 0.1, buf = 0.9 * 0.05 + 0.1 = 0.145, b = 0.995 - 0.2 * 0.145 = 0.966."""
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    c = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))  # same group without the quirk
    opt = LARS([{"params": [b], "lars_exclude": True, "grad_times_lr": True},
                {"params": [c], "lars_exclude": True}], lr=0.1, momentum=0.9)
    for lr in (0.1, 0.2):
        for group in opt.param_groups:
            group["lr"] = lr
        b.grad, c.grad = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.966], dtype=torch.float64))
    # plain SGD: 1 - 0.1 * 0.5 = 0.95, then buf = 0.45 + 0.5 = 0.95, 0.95 - 0.2 * 0.95 = 0.76
    torch.testing.assert_close(c.detach(), torch.tensor([0.76], dtype=torch.float64))


def _custom_lars_reference(sgd, eta, eps):
    """One step of torchlars ``LARS.step`` with SCRL's ``CustomLARS.apply_adaptive_lrs``, written
    from the official code: weight decays hidden from SGD, grad += wd * p, grad *= trust ratio
    (LARS groups) or group lr (``lars_adaptation: False``), then the wrapped SGD step."""
    decays = [g["weight_decay"] for g in sgd.param_groups]
    for g in sgd.param_groups:
        g["weight_decay"] = 0
    with torch.no_grad():
        for g, wd in zip(sgd.param_groups, decays):
            for p in g["params"]:
                if g["lars_adaptation"]:
                    pn, gn = p.norm(), p.grad.norm()
                    scale = pn / (gn + wd * pn + eps) * eta if pn > 0 and gn > 0 else 1.0
                else:
                    scale = g["lr"]
                p.grad.add_(p.data, alpha=wd)
                p.grad.mul_(scale)
    sgd.step()
    for g, wd in zip(sgd.param_groups, decays):
        g["weight_decay"] = wd


def test_scrl_switch_matches_custom_lars_reference():
    """Three steps with a changing lr (warmup-like) agree with the official arithmetic."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    ours = [nn.Parameter(w.clone()), nn.Parameter(b.clone())]
    ref = [nn.Parameter(w.clone()), nn.Parameter(b.clone())]
    eta, wd, eps = 1e-3, 1e-6, 1e-8
    opt = LARS([{"params": [ours[0]], "weight_decay": wd},
                {"params": [ours[1]], "weight_decay": 0.0, "lars_exclude": True, "grad_times_lr": True}],
               lr=0.1, momentum=0.9, eta=eta, eps=eps)
    sgd = torch.optim.SGD([{"params": [ref[0]], "lars_adaptation": True, "weight_decay": wd},
                           {"params": [ref[1]], "lars_adaptation": False, "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    for lr in (0.5, 3.0, 14.4):
        grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)]
        for o in (opt, sgd):
            for group in o.param_groups:
                group["lr"] = lr
        for p, r, g in zip(ours, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        _custom_lars_reference(sgd, eta, eps)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-12)


def _scrl_official_split():
    """(shape, excluded) of every trained parameter of SCRL's own model under its name rule:
    torchvision ResNet-50 children in an nn.Sequential (``encoder.<i>``), projector and predictor
    ``TwoLayerLinearHead`` (``net = Sequential(Linear, BatchNorm1d, ReLU, Linear(bias=False))``)."""
    from torchvision.models import resnet50

    def head(d_in):
        return nn.Sequential(nn.Linear(d_in, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, 256, bias=False))

    online = nn.Module()
    online.encoder = nn.Sequential(*list(resnet50().children())[:-1])
    online.projector = nn.Module()
    online.projector.net = head(2048)
    predictor = nn.Module()
    predictor.net = head(256)
    named = list(online.named_parameters()) + list(predictor.named_parameters())
    assert "encoder.1.weight" in dict(named) and "encoder.4.0.downsample.1.weight" in dict(named)
    return sorted((tuple(p.shape), "bn" in n or "bias" in n) for n, p in named)


def test_scrl_config_reproduces_official_exclusion_and_quirk():
    """configs/scrl.yaml's name rule on Detectron2's names excludes exactly the parameters SCRL's
    rule excludes on its torchvision model (same shapes, same split: the 48 block-BN weights and
    every bias); the trainer's LARS gets the lr-squared switch on the excluded group only."""
    from detectron2.modeling import build_model

    from regionssl.engine import PretrainTrainer, get_regionssl_cfg

    cfg = get_regionssl_cfg("configs/quick_schedules/scrl_instant_test.yaml", ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    opt = PretrainTrainer.build_optimizer(cfg, model)
    excluded = {id(p) for g in opt.param_groups if g["lars_exclude"] for p in g["params"]}
    ours = sorted((tuple(p.shape), id(p) in excluded) for g in opt.param_groups for p in g["params"])
    assert ours == _scrl_official_split()
    assert id(model.backbone.stem.conv1.norm.weight) not in excluded
    assert id(model.backbone.res3[0].shortcut.norm.weight) not in excluded
    assert id(model.backbone.res3[0].conv2.norm.weight) in excluded
    assert [g.get("grad_times_lr", False) for g in opt.param_groups] == [False, True]
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.SOLVER.WEIGHT_DECAY, 0.0]
    block_bn_weights = [n for n, p in model.named_parameters() if id(p) in excluded and not n.endswith(".bias")]
    assert len(block_bn_weights) == 48  # 16 bottlenecks x 3
    # BYOL (DeepMind's rule) keeps the by-type exclusion and a plain SGD step for excluded params
    byol = get_regionssl_cfg("configs/quick_schedules/byol_instant_test.yaml", ["MODEL.DEVICE", "cpu"])
    assert byol.SOLVER.REGIONSSL.LARS_EXCLUDE_NAMES == "" and not byol.SOLVER.REGIONSSL.LARS_EXCLUDED_GRAD_TIMES_LR

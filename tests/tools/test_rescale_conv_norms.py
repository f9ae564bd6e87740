"""tools/rescale_conv_norms.py: the detector computes the same function after the rescale (train and
eval mode), every conv feeding a BatchNorm gets the init's norm, and a real checkpoint still loads."""
import importlib.util
import math
import os

import pytest
import torch
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock

from conftest import ROOT as REPO

spec = importlib.util.spec_from_file_location("rescale_conv_norms", os.path.join(REPO, "tools", "rescale_conv_norms.py"))
rescale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rescale)


def _trunk():
    torch.manual_seed(0)
    return torch.nn.Sequential(BasicStem(3, 16, norm="BN"), BottleneckBlock(16, 32, bottleneck_channels=8, norm="BN"))


def test_same_function_and_init_norms(tmp_path):
    net = _trunk()
    with torch.no_grad():  # a pretraining that grew the stem 30x and res2's first conv 2x
        net[0].conv1.weight *= 30
        net[1].conv1.weight *= 2
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    net.train()
    net(x)  # running statistics of the grown weights
    net.eval()
    before_eval = net(x)
    torch.save({"model": net.state_dict(), "iteration": 9}, tmp_path / "in.pth")
    net.train()
    before_train = net(x)  # (moves the running statistics again: saved before)
    factors = rescale.main([str(tmp_path / "in.pth"), str(tmp_path / "out.pth")])

    out = torch.load(tmp_path / "out.pth", weights_only=False)
    assert out["iteration"] == 9 and set(out["model"]) == set(net.state_dict())
    # the stem, the block's three convs and its projection shortcut; every one now at c2_msra_fill's std
    assert sorted(factors) == ["0.conv1.weight", "1.conv1.weight", "1.conv2.weight", "1.conv3.weight",
                               "1.shortcut.weight"]
    for name in factors:
        w = out["model"][name]
        assert float(w.std()) == pytest.approx(math.sqrt(2 / (w.shape[0] * w.shape[2] * w.shape[3])), rel=1e-5)
    assert factors["0.conv1.weight"] < factors["1.conv1.weight"] < 1

    net2 = _trunk()
    net2.load_state_dict(out["model"])
    net2.eval()
    # the same up to BatchNorm's eps (1e-5 added to variances that the rescale divided by up to 29^2)
    after_eval = net2(x)
    net2.train()
    after_train = net2(x)
    for after, before in ((after_eval, before_eval), (after_train, before_train)):
        assert float((after - before).abs().max()) < 0.01 * float(before.abs().max())
    # and invariant where eps does not matter: with eps 1e-12 the two agree to float precision
    for m in list(net.modules()) + list(net2.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-12
    net.train()
    net2.train()
    torch.testing.assert_close(net2(x), net(x), rtol=1e-4, atol=1e-4)


def test_refuses_to_overwrite_and_missing_input(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        rescale.main([str(tmp_path / "none.pth"), str(tmp_path / "out.pth")])
    torch.save({"model": {"fc.weight": torch.ones(2, 2)}}, tmp_path / "fc.pth")
    with pytest.raises(SystemExit, match="must be a new file"):
        rescale.main([str(tmp_path / "fc.pth"), str(tmp_path / "fc.pth")])
    with pytest.raises(SystemExit, match="no convolution followed by a BatchNorm"):
        rescale.main([str(tmp_path / "fc.pth"), str(tmp_path / "out.pth")])

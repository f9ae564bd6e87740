"""Projection and prediction heads."""
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """``Linear(in, hidden) [-> BN] -> ReLU -> Linear(hidden, out)``.

    MoCo-v2: hidden 2048, out 128, no norm. BYOL/SCRL projector and predictor: hidden 4096,
    out 256, BN, last layer without bias. SwAV: hidden 2048, out 128, BN.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, norm="", last_bias=True):
        layers = [nn.Linear(in_dim, hidden_dim)]
        if norm == "BN":
            layers.append(nn.BatchNorm1d(hidden_dim))
        elif norm:
            raise ValueError(f"Unknown projector norm {norm!r}: use '' or 'BN'")
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=last_bias)]
        super().__init__(*layers)

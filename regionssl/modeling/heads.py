"""Projection and prediction heads."""
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

__all__ = ["MLP", "NaiveSyncBatchNorm1d"]


class NaiveSyncBatchNorm1d(NaiveSyncBatchNorm):
    """Detectron2's all-reduce SyncBN for (N, C) inputs (it only takes (N, C, H, W)).

    For several CPU processes, where ``nn.SyncBatchNorm`` refuses CPU tensors (docs/design.md, Distributed).
    Same parameters and buffers as ``nn.BatchNorm1d``, so checkpoints load across norms.
    Statistics are weighted by each process's row count (``stats_mode="N"``), as
    ``nn.SyncBatchNorm`` does: exact when processes hold different numbers of rows (SCRL's boxes),
    and a process with 0 rows still joins the all-reduce (``stats_mode=""`` would assert).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("stats_mode", "N")
        super().__init__(*args, **kwargs)

    def forward(self, x):
        return super().forward(x[:, :, None, None])[:, :, 0, 0]


def _norm_1d(norm, dim, affine=True):
    if norm == "BN":
        return nn.BatchNorm1d(dim, affine=affine)
    if norm == "SyncBN":  # nn.SyncBatchNorm accepts (N, C); plain BN when not distributed
        return nn.SyncBatchNorm(dim, affine=affine)
    if norm == "naiveSyncBN":
        return NaiveSyncBatchNorm1d(dim, affine=affine)
    raise ValueError(f"Unknown projector norm {norm!r}: use '', 'BN', 'SyncBN' or 'naiveSyncBN'")


class MLP(nn.Sequential):
    """``Linear(in, hidden) [-> BN] -> ReLU -> Linear(hidden, out) [-> BN without affine]``.

    MoCo-v2: hidden 2048, out 128, no norm. BYOL/SCRL projector and predictor: hidden 4096,
    out 256, BN, last layer without bias. SwAV: hidden 2048, out 128, BN. MoCo v3 also
    normalises the output (``out_norm``, BN without scale/shift), which removes the component
    shared by every embedding of the batch.
    ``norm``, ``out_norm``: "" | "BN" | "SyncBN" (BYOL/SCRL sync the heads' BN across devices too)
    | "naiveSyncBN".
    """

    def __init__(self, in_dim, hidden_dim, out_dim, norm="", last_bias=True, out_norm=""):
        layers = [nn.Linear(in_dim, hidden_dim)]
        if norm:
            layers.append(_norm_1d(norm, hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=last_bias)]
        if out_norm:
            layers.append(_norm_1d(out_norm, out_dim, affine=False))
        super().__init__(*layers)

    @property
    def out_features(self):
        """Width of the output (the last Linear's)."""
        return [m for m in self if isinstance(m, nn.Linear)][-1].out_features

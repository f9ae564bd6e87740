"""Loss functions (pure). All similarity math is done in fp32, also under autocast."""
import torch
import torch.nn.functional as F

__all__ = ["info_nce", "byol_regression"]


def info_nce(q, k, negatives, temperature):
    """MoCo InfoNCE: ``-log exp(q.k/T) / (exp(q.k/T) + sum_n exp(q.n/T))``.

    Args:
        q: (N, D) L2-normalised queries.
        k: (N, D) L2-normalised positive keys (no gradient needed).
        negatives: (D, K) L2-normalised negatives, shared by all queries (a queue, or a key map).
        temperature: T.
    Returns:
        loss (scalar, mean over N) and logits (N, 1 + K), positive at column 0.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, negatives = q.float(), k.float(), negatives.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ negatives  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), logits


def byol_regression(p, z):
    """BYOL / SCRL regression ``2 - 2 cos(p, z)`` averaged over rows.

    Args:
        p: (N, D) online predictions q_theta(g_theta(.)).
        z: (N, D) target projections g_xi(.) (treated as constants).
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = F.normalize(p.float(), dim=1)
        z = F.normalize(z.detach().float(), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()

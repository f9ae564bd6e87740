"""SwAV's Sinkhorn-Knopp code assignment and swapped-prediction loss (docs/methods/swav.md).

Official algorithm (``facebookresearch/swav``, ``main_swav.py`` ``distributed_sinkhorn``), with
scores ``z C^T`` of shape (B_local, K), B = B_local * world_size::

    Q = exp(scores / eps).T                    # (K, B_local)
    Q /= all_reduce(sum(Q))
    repeat num_iters:
        Q /= all_reduce(Q.sum(dim=1)); Q /= K  # each prototype gets mass 1/K over the global batch
        Q /= Q.sum(dim=0);             Q /= B  # each sample gets mass 1/B
    return (Q * B).T                            # (B_local, K): every row sums to 1

The official code exponentiates ``scores / eps`` directly, which overflows float32 once
``scores / eps`` exceeds ~88 and underflows to 0/0 = NaN when a prototype is far from every sample.
Here the same iterations run on log-potentials (``log Q = scores/eps + u[k] + v[b]``) with
max-subtracted log-sum-exps whose maxima are all-reduced (MAX) across processes. Every per-row and
per-column factor the official code divides by is exactly an additive potential here, so the result
is the official one up to float rounding wherever the official one is finite, and finite always.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["sinkhorn_knopp", "swav_loss"]


def _world_size(reduce):
    if not reduce or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_reduce(x, op, world_size):
    if world_size > 1:
        dist.all_reduce(x, op=op)
    return x


def _logsumexp_dim0(x, world_size):
    """log(sum over the *global* first dimension of exp(x)); x: (B_local, K) -> (K,).

    The per-column maximum is all-reduced (MAX) before exponentiating, so no process overflows and
    every column keeps at least one term equal to exp(0) = 1 (no 0/0)."""
    m = _all_reduce(x.max(dim=0).values, dist.ReduceOp.MAX, world_size)  # (K,)
    s = _all_reduce(torch.exp(x - m).sum(dim=0), dist.ReduceOp.SUM, world_size)  # (K,)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, num_iters, world_size_reduce=True):
    """SwAV's distributed Sinkhorn-Knopp: soft, equipartitioned codes Q from prototype scores.

    Args:
        scores (Tensor): (B_local, K) scores ``z C^T`` of the local batch (any float dtype).
        epsilon (float): entropy regularisation eps (SwAV: 0.05).
        num_iters (int): Sinkhorn iterations (SwAV: 3).
        world_size_reduce (bool): all-reduce the row statistics across processes when
            torch.distributed is initialised with world size > 1 (then ``B`` is the global batch,
            each process gets the rows of its own samples, and every process must call this).
            With False, or without torch.distributed, the local batch is the whole problem.

    Returns:
        Tensor (B_local, K), float32, no gradient: codes q. Each row sums to 1 (the last step is
        the per-sample normalisation); the prototype marginals ``codes.sum(0)`` summed over all
        processes approach ``B / K`` as ``num_iters`` grows (only approximately after 3).
    """
    assert scores.dim() == 2, f"scores must be (B, K), got {tuple(scores.shape)}"
    world_size = _world_size(world_size_reduce)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = scores.float() / epsilon  # (B_local, K) = log of the official exp(scores / eps)
        K = logits.shape[1]
        B = _all_reduce(
            logits.new_full((), float(logits.shape[0])), dist.ReduceOp.SUM, world_size,
        )  # global batch size, as a tensor so unequal local batches also work (made on the device: no copy)
        # Q /= sum(Q): only matters for num_iters == 0, the first row step cancels it otherwise.
        total = _logsumexp_dim0(torch.logsumexp(logits, dim=1, keepdim=True), world_size)
        log_q = logits - total  # (B_local, K)
        if num_iters == 0:
            return torch.exp(log_q + torch.log(B))
        v = torch.zeros_like(log_q[:, :1])  # (B_local, 1) per-sample log-potential
        for _ in range(num_iters):
            # Row step: prototype k's global mass becomes 1/K; u: (1, K).
            u = -_logsumexp_dim0(log_q + v, world_size)[None, :] - math.log(K)
            # Column step (local): sample b's mass becomes 1/B; v: (B_local, 1).
            v = -torch.logsumexp(log_q + u, dim=1, keepdim=True) - torch.log(B)
        # The last column step followed by "* B" is a softmax over prototypes; writing it as one
        # keeps the rows summing to 1 to float32 precision even for |scores / eps| ~ 1e3.
        return torch.softmax(log_q + u, dim=1)


def swav_loss(scores_per_crop, codes_per_assigned_crop, crops_for_assign, temperature):
    """SwAV swapped-prediction loss (docs/methods/swav.md).

    ``L = 1/|S| sum_{s in S} 1/(V-1) sum_{v != s} -mean_b sum_k q_s[b, k] log p_v[b, k]`` with
    ``p_v = softmax(z_v C^T / tau)`` over the K prototypes.

    Args:
        scores_per_crop (Sequence[Tensor]): V tensors (B, K), scores ``z_v C^T`` of every crop v.
        codes_per_assigned_crop (Sequence[Tensor]): |S| tensors (B, K), codes q_s from
            :func:`sinkhorn_knopp`, in the order of ``crops_for_assign`` (treated as constants).
        crops_for_assign (Sequence[int]): crop indices S that get codes (SwAV: [0, 1]).
        temperature (float): softmax temperature tau (SwAV: 0.1).

    Returns:
        Scalar float32 tensor, differentiable w.r.t. the scores. Computed in float32 even under
        autocast.
    """
    V = len(scores_per_crop)
    assert V >= 2, "swapped prediction needs at least two crops"
    assert len(codes_per_assigned_crop) == len(crops_for_assign) > 0
    device_type = scores_per_crop[0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores_per_crop]  # (B, K)
        loss = 0.0
        for s, q in zip(crops_for_assign, codes_per_assigned_crop):
            q = q.detach().float()
            cross = [-(q * log_p[v]).sum(dim=1).mean() for v in range(V) if v != s]
            loss = loss + torch.stack(cross).sum() / (V - 1)
        return loss / len(crops_for_assign)

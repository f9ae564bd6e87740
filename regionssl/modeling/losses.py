"""Loss functions (pure). All similarity math is done in fp32, also under autocast."""
import torch
import torch.nn.functional as F

__all__ = ["info_nce", "info_nce_in_batch", "byol_regression"]


def _first_column_nce(l_pos, l_neg, temperature):
    """Cross-entropy with the positive logit in column 0: loss, logits (N, 1 + K) / T."""
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), logits


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
        return _first_column_nce(l_pos, q @ negatives, temperature)  # l_neg: (N, K)


def info_nce_in_batch(q, keys, own, temperature):
    """InfoNCE whose negatives are the *other* keys of the batch (MoCo v3; SimCLR without the
    query-query terms): query i is scored against every key, its own key ``keys[own[i]]`` is the
    positive and the remaining M - 1 keys are its negatives.

    Args:
        q: (N, D) L2-normalised queries.
        keys: (M, D) L2-normalised keys of the whole (global) batch, M >= N.
        own: (N,) long, row of ``keys`` holding query i's positive.
        temperature: T.
    Returns:
        loss (scalar, mean over N) and logits (N, M), positive at column 0 (same layout as
        :func:`info_nce`, with K = M - 1).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        sims = q.float() @ keys.float().t()  # (N, M)
        is_pos = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, own[:, None], True)
        l_pos = sims[is_pos].view(-1, 1)  # (N, 1)
        l_neg = sims[~is_pos].view(sims.shape[0], -1)  # (N, M - 1), other keys in batch order
        return _first_column_nce(l_pos, l_neg, temperature)


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


# ---------------------------------------------------------------- CVSA (cross-view saliency alignment)
__all__ += ["cross_view_attention", "saliency_alignment"]


def cross_view_attention(q, k, temperature):
    """Where a query map and a key map attend to each other (CVSA; see docs/methods/cvsa.md).

    With cosine similarities ``s_ij = cos(q_i, k_j) / T`` between query positions i and key
    positions j:

    * key map   ``a^k_j = mean_i softmax_j(s_ij)``: every query position spreads unit mass over
      the key positions (query onto key); averaged over i, so ``sum_j a^k_j = 1``;
    * query map ``a^q_i = mean_j softmax_i(s_ij)``: every key position spreads unit mass over
      the query positions (key onto query); ``sum_i a^q_i = 1``.

    Args:
        q: (N, D, Hq, Wq) query maps (online conv projector + predictor).
        k: (N, D, Hk, Wk) key maps (target conv projector).
        temperature: T.
    Returns:
        a_q (N, Hq*Wq), a_k (N, Hk*Wk), each row a distribution (fp32).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float().flatten(2), dim=1)  # (N, D, Pq)
        k = F.normalize(k.float().flatten(2), dim=1)  # (N, D, Pk)
        logits = torch.einsum("ndp,ndr->npr", q, k) / temperature  # (N, Pq, Pk)
        a_k = logits.softmax(dim=2).mean(dim=1)  # (N, Pk)
        a_q = logits.softmax(dim=1).mean(dim=2)  # (N, Pq)
        return a_q, a_k


def saliency_alignment(attention, mask, eps=1e-12):
    """KL(m || a) between a saliency mask m (normalised to sum 1) and an attention map a.

    ``KL = sum_p m_p log(m_p / a_p) >= 0``, with equality iff ``a = m`` (Gibbs' inequality), so
    the loss is minimal (0) exactly when the attention map equals the normalised mask. Images
    whose mask has no mass (the pasted window left the view) carry no target and are skipped.

    Args:
        attention: (N, P) distributions (rows sum to 1).
        mask: (N, P) non-negative saliency on the same grid.
    Returns:
        loss (scalar: mean KL over images with a mask; 0 if none, graph kept) and valid (N,) bool.
    """
    with torch.autocast(device_type=attention.device.type, enabled=False):
        a, mask = attention.float(), mask.detach().float()
        mass = mask.sum(dim=1)
        valid = mass > eps
        m = mask / mass.clamp_min(eps)[:, None]
        kl = (torch.xlogy(m, m) - m * a.clamp_min(eps).log()).sum(dim=1)  # (N,)
        loss = (kl * valid).sum() / valid.sum().clamp_min(1)
        return loss, valid

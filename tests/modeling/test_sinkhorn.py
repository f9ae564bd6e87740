"""Tests for SwAV's Sinkhorn-Knopp and swapped-prediction loss (regionssl/modeling/sinkhorn.py)."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.engine import launch

from regionssl.modeling.sinkhorn import sinkhorn_knopp, swav_loss


def _official_sinkhorn(out, epsilon, num_iters, world_size=1):
    """Direct single-process re-implementation of SwAV's ``distributed_sinkhorn`` (no max
    subtraction; the all-reduces are identities for one process)."""
    Q = torch.exp(out / epsilon).t()  # (K, B)
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    Q = Q / torch.sum(Q)
    for _ in range(num_iters):
        Q = Q / torch.sum(Q, dim=1, keepdim=True)
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    Q = Q * B
    return Q.t()


def _scores(B, K, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, 16, generator=gen), dim=1)
    c = F.normalize(torch.randn(K, 16, generator=gen), dim=1)
    return scale * z @ c.t()  # cosine scores in [-scale, scale], like SwAV's


@pytest.mark.parametrize("num_iters", [0, 1, 3, 10])
def test_equals_official_algorithm(num_iters):
    scores = _scores(64, 30, seed=0)
    ours = sinkhorn_knopp(scores, epsilon=0.05, num_iters=num_iters)
    ref = _official_sinkhorn(scores, 0.05, num_iters)
    assert ours.shape == (64, 30) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)
    # float64 reference agrees as well (both are float32 approximations of it).
    ref64 = _official_sinkhorn(scores.double(), 0.05, num_iters).float()
    torch.testing.assert_close(ours, ref64, atol=1e-6, rtol=1e-4)


def test_marginals():
    B, K = 48, 12
    scores = _scores(B, K, seed=1)
    codes = sinkhorn_knopp(scores, epsilon=0.05, num_iters=3)
    # The official algorithm ends with the per-sample step: every code row sums to exactly 1.
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(B), atol=1e-6, rtol=0)
    # After 3 iterations the prototype marginals are only approximately B/K ...
    marg3 = codes.sum(dim=0)
    # ... and they converge to B/K = 4 with more iterations (Sinkhorn's fixed point).
    codes_many = sinkhorn_knopp(scores, epsilon=0.05, num_iters=200)
    torch.testing.assert_close(codes_many.sum(dim=0), torch.full((K,), B / K), atol=1e-4, rtol=0)
    torch.testing.assert_close(codes_many.sum(dim=1), torch.ones(B), atol=1e-6, rtol=0)
    assert (marg3 - B / K).abs().max() > (codes_many.sum(dim=0) - B / K).abs().max()


def test_known_closed_form():
    # Scores constant per row: exp(s/eps) = a_b * 1. Row step makes every prototype's column of
    # the (K, B) matrix proportional to a_b; column step then makes every entry 1/(K B). So the
    # codes are exactly uniform 1/K whatever a_b is.
    scores = torch.tensor([[0.3, 0.3, 0.3], [-0.2, -0.2, -0.2]])
    torch.testing.assert_close(
        sinkhorn_knopp(scores, 0.05, 3), torch.full((2, 3), 1 / 3), atol=1e-7, rtol=0
    )


def test_stable_where_naive_overflows():
    scores = _scores(64, 30, seed=2)
    eps = 1e-3  # scores / eps up to 1000: exp overflows float32 (> 88)
    with torch.no_grad():
        naive = _official_sinkhorn(scores, eps, 3)
    assert not torch.isfinite(naive).all()
    codes = sinkhorn_knopp(scores, eps, 3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    # At scores / eps <= 500 float32 still overflows but the float64 official algorithm does not
    # (exp(500) ~ 1e217): there the results agree.
    assert not torch.isfinite(_official_sinkhorn(scores, 2e-3, 3)).all()
    ref64 = _official_sinkhorn(scores.double(), 2e-3, 3).float()
    assert torch.isfinite(ref64).all()
    torch.testing.assert_close(sinkhorn_knopp(scores, 2e-3, 3), ref64, atol=1e-5, rtol=1e-4)
    # Far beyond float64 too: still finite and still rows summing to one.
    codes = sinkhorn_knopp(scores * 100, eps, 3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_autocast_and_half_input():
    scores = _scores(16, 8, seed=3)
    expected = sinkhorn_knopp(scores, 0.05, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_knopp(scores, 0.05, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_swav_loss_by_hand():
    # Two prototypes, one sample, three crops, codes for crops {0, 1}, tau = 0.5.
    # Crop scores: z0 = [1, 0], z1 = [0, 1], z2 = [0.5, 0.5]. log softmax(z / 0.5):
    #   crop0: [2, 0] -> [-log(1+e^-2), -2-log(1+e^-2)] = [-0.126928, -2.126928]
    #   crop1: [0, 2] -> [-2.126928, -0.126928];  crop2: [1, 1] -> [-log 2, -log 2]
    # q0 = [1, 0], q1 = [0.25, 0.75].
    # s=0: v=1: -(1 * -2.126928) = 2.126928; v=2: log 2 = 0.693147 -> mean 1.410038
    # s=1: v=0: -(0.25*-0.126928 + 0.75*-2.126928) = 1.626928; v=2: 0.693147 -> mean 1.160038
    # L = (1.410038 + 1.160038) / 2 = 1.285038
    scores = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])]
    loss = swav_loss(scores, codes, crops_for_assign=[0, 1], temperature=0.5)
    l1 = math.log1p(math.exp(-2.0))
    expected = ((2 + l1) + math.log(2)) / 2
    expected = (expected + ((0.25 * l1 + 0.75 * (2 + l1)) + math.log(2)) / 2) / 2
    assert abs(expected - 1.285038) < 1e-6
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)


def test_swav_loss_matches_official_loop_and_grads():
    gen = torch.Generator().manual_seed(4)
    B, K, V, tau = 8, 10, 4, 0.1
    scores = [torch.randn(B, K, generator=gen, requires_grad=True) for _ in range(V)]
    codes = [sinkhorn_knopp(scores[i].detach(), 0.05, 3) for i in (0, 1)]
    loss = swav_loss(scores, codes, [0, 1], tau)
    # Official main_swav.py loop.
    ref = 0
    for i, crop_id in enumerate([0, 1]):
        subloss = 0
        for v in [v for v in range(V) if v != crop_id]:
            x = scores[v] / tau
            subloss -= torch.mean(torch.sum(codes[i] * F.log_softmax(x, dim=1), dim=1))
        ref += subloss / (V - 1)
    ref /= 2
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in scores)


def _two_process_worker(scores, out_dir):
    rank = dist.get_rank()
    local = scores.chunk(2)[rank]
    torch.save(sinkhorn_knopp(local, 0.05, 3), os.path.join(out_dir, f"codes{rank}.pt"))
    # world_size_reduce=False solves the local problem only.
    torch.save(
        sinkhorn_knopp(local, 0.05, 3, world_size_reduce=False),
        os.path.join(out_dir, f"local{rank}.pt"),
    )


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """Detectron2's ``launch`` works on CPU (gloo): two processes with half the batch each get
    exactly the rows one process computes from the whole batch."""
    scores = _scores(32, 20, seed=5)
    launch(_two_process_worker, 2, dist_url="auto", args=(scores, str(tmp_path)))
    codes = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    torch.testing.assert_close(codes, sinkhorn_knopp(scores, 0.05, 3), atol=1e-6, rtol=0)
    for r, half in enumerate(scores.chunk(2)):
        local = torch.load(tmp_path / f"local{r}.pt")
        torch.testing.assert_close(local, sinkhorn_knopp(half, 0.05, 3), atol=1e-6, rtol=0)

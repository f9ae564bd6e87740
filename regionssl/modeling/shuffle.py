"""MoCo's shuffle-BN, generalised to images *and* their boxes, and per-group BatchNorm.

* :func:`shuffled_forward` runs the key encoder on a batch shuffled across processes (and, with
  ``splits > 1``, across BatchNorm groups of one process), routed by a :class:`ShufflePlan` with
  ``all_to_all``, then unshuffles its output rows;
* :func:`split_forward` runs a batch in groups (per-group BatchNorm, one-process shuffle-BN).
"""
import torch
from detectron2.utils import comm

from ..utils.distributed import all_to_all_rows, broadcast_from_rank0, to_device, world_size
from .poolers import as_box_tensor

__all__ = ["split_forward", "shuffled_forward", "ShufflePlan"]


def _take(boxes, idx):
    """Rows ``idx`` of a per-image box list, or of every level of a per-level list of such lists."""
    if boxes is None:
        return None
    if boxes and isinstance(boxes[0], (list, tuple)):
        return [[level[i] for i in idx] for level in boxes]
    return [boxes[i] for i in idx]


def _cat(outs, dim=0):
    """Concatenate a list of outputs that are tensors or tuples of tensors (element-wise)."""
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=dim) for parts in zip(*outs))
    return torch.cat(outs, dim=dim)


def _rows(out, index):
    """``out`` (or every tensor of a tuple) at the rows ``index`` (host list), gathered on its device."""
    if isinstance(out, tuple):
        return tuple(_rows(o, index) for o in out)
    return out.index_select(0, to_device(torch.tensor(index, dtype=torch.long), out.device))


def split_forward(fn, images, boxes, splits=1, dim=0):
    """Run ``fn`` on ``splits`` consecutive groups of the batch and concatenate along ``dim``.

    Each call sees only its group, so BatchNorm statistics are per group: MoCo's 1-GPU demo
    (``facebookresearch/moco`` ``colab/moco_cifar10_demo.ipynb``, ``SplitBatchNorm``) simulates
    the per-GPU BN of an 8-GPU run this way. ``splits <= 1`` is ``fn(images, boxes)``.

    Args:
        images: (N, 3, H, W); boxes: list of N (R_i, 4), or a list over levels of such lists, or None.
        dim: axis of ``fn``'s output that runs over regions (0 for (R, D), 1 for (L, R, D)).
            ``fn`` may return a tuple of tensors: each is concatenated.
    """
    if splits <= 1:
        return fn(images, boxes)
    n = images.shape[0]
    assert n >= splits, f"MODEL.REGIONSSL.BN_SPLITS={splits} needs at least {splits} images per process, got {n}"
    groups = [g.tolist() for g in torch.arange(n).tensor_split(splits)]  # host indices
    return _cat([fn(images[g[0] : g[-1] + 1], _take(boxes, g)) for g in groups], dim=dim)


class ShufflePlan:
    """Who encodes which image in a cross-process shuffle, and how many output rows each image has.

    Global image ``g = r * n + i`` is image i of rank r (n images on every rank). ``perm``, rank 0's
    random permutation of the G = W n global images, gives rank r the images
    ``perm[r n : (r + 1) n]`` to encode (MoCo's ``idx_shuffle``). Everything here is host ints.

    Attributes:
        n, rank, world: images per rank, this rank, world size.
        perm: list of G global image indices.
        rows: list of G ints, rows of ``fn``'s output per global image (its boxes; 1 without boxes).
    """

    def __init__(self, perm, rows, n, rank, world):
        self.perm, self.rows, self.n, self.rank, self.world = list(perm), list(rows), n, rank, world

    @classmethod
    def draw(cls, n, rows_per_image=None, device="cpu"):
        """Draw the permutation on rank 0 and learn every rank's rows per image.

        One broadcast (+ one all_gather when ``rows_per_image``, this rank's host list of n ints,
        is given) and **one** host read for both. The permutation comes from the host generator.
        """
        world, rank = world_size(), comm.get_rank()
        perm = broadcast_from_rank0(to_device(torch.randperm(world * n), device))
        if rows_per_image is None:
            values = perm.tolist()
            return cls(values, [1] * len(values), n, rank, world)
        assert len(rows_per_image) == n, f"{len(rows_per_image)} row counts for {n} images"
        local = to_device(torch.tensor(list(rows_per_image), dtype=torch.long), device)
        counts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(counts, local)
        values = torch.cat([perm.to(local.dtype)] + counts).tolist()  # the one host read
        return cls(values[: world * n], values[world * n :], n, rank, world)

    def encoded_by(self, r):
        """Global images rank r encodes, in encoding order."""
        return self.perm[r * self.n : (r + 1) * self.n]

    def own(self, r):
        return list(range(r * self.n, (r + 1) * self.n))

    def rows_per_rank(self):
        """Output rows of every rank's own images: list of W ints (the keys each rank enqueues)."""
        return [sum(self.rows[g] for g in self.own(r)) for r in range(self.world)]

    def route(self, x, have, send, recv, want, rows=None):
        """Move per-image row blocks between ranks (one ``all_to_all``) and order them as ``want``.

        Args:
            x: rows of the global images ``have``, in that order, ``rows[g]`` rows per image g
               (default :attr:`rows`); a tuple of such tensors is routed element-wise.
            send: per destination rank, the images of ``have`` it gets, in its order.
            recv: per source rank, the images that arrive from it, in order.
            want: the received images in the order to return.
        """
        rows = self.rows if rows is None else rows
        if isinstance(x, tuple):
            return tuple(self.route(t, have, send, recv, want, rows) for t in x)
        out_rows = _block_rows(have, [g for dest in send for g in dest], rows)
        if out_rows != list(range(x.shape[0])):
            x = _rows(x, out_rows)
        got = all_to_all_rows(x, [sum(rows[g] for g in d) for d in send], [sum(rows[g] for g in s) for s in recv])
        in_rows = _block_rows([g for src in recv for g in src], want, rows)
        return got if in_rows == list(range(got.shape[0])) else _rows(got, in_rows)

    def _owner(self, g):
        return g // self.n

    def to_encoders(self, x, rows=None):
        """This rank's own rows ``x`` -> the rows of the images this rank encodes (encoding order)."""
        send = [[g for g in self.encoded_by(r) if self._owner(g) == self.rank] for r in range(self.world)]
        mine = self.encoded_by(self.rank)
        recv = [[g for g in mine if self._owner(g) == s] for s in range(self.world)]
        return self.route(x, self.own(self.rank), send, recv, mine, rows)

    def to_owners(self, x, rows=None):
        """Rows of the images this rank encoded -> this rank's own rows, in input order."""
        mine = self.encoded_by(self.rank)
        send = [[g for g in mine if self._owner(g) == r] for r in range(self.world)]
        recv = [[g for g in self.encoded_by(s) if self._owner(g) == self.rank] for s in range(self.world)]
        return self.route(x, mine, send, recv, self.own(self.rank), rows)


def _block_rows(have, want, rows):
    """Row indices, in a tensor holding the blocks of images ``have`` (``rows[g]`` rows each, in that
    order), of the blocks of images ``want``, in that order."""
    start, pos = {}, 0
    for g in have:
        start[g], pos = pos, pos + rows[g]
    return [i for g in want for i in range(start[g], start[g] + rows[g])]


@torch.no_grad()
def shuffled_forward(fn, images, boxes, splits=1, plan=None):
    """Run ``fn(images, boxes)`` on a shuffled batch, then unshuffle its output rows.

    MoCo's shuffle-BN: the key encoder's BatchNorm then sees statistics of a random subset of the
    global batch, not of the images its queries came from, which closes the intra-batch
    statistics shortcut. Boxes travel with their images (InsLoc shuffles both). Across processes
    the whole global batch is permuted; with ``splits > 1`` each process then runs its share in
    ``splits`` groups (:func:`split_forward`), which also gives one process a shuffle-BN over
    ``splits`` virtual devices. One process with ``splits <= 1`` is ``fn(images, boxes)``.

    Traffic: images (in their own dtype: send uint8 views and normalise inside ``fn``), boxes and
    outputs each go once to the one rank that needs them (``all_to_all``), not to every rank;
    outputs keep ``fn``'s dtype. Host reads: the plan's one (none in one process).

    Args:
        images: (N, 3, H, W), N equal on every rank.
        boxes: list of N Boxes / (R_i, 4) tensors in the same order, or None: ``fn`` then returns
            one row per image.
        plan: a :class:`ShufflePlan` drawn for these images and boxes (drawn here if None).
    Returns:
        ``fn``'s output rows (a tensor or a tuple of tensors, rows = regions, or images without
        boxes) for this rank's own images, in input order.
    """
    n = images.shape[0]
    rows = None if boxes is None else [len(b) for b in boxes]
    if world_size() == 1:
        if splits <= 1:
            return fn(images, boxes)
        perm = torch.randperm(n).tolist()  # host generator: no device sync
        out = split_forward(fn, _rows(images, perm), _take(boxes, perm), splits)
        return _rows(out, _block_rows(perm, range(n), [1] * n if rows is None else rows))
    if plan is None:
        plan = ShufflePlan.draw(n, rows, images.device)
    mine = plan.encoded_by(plan.rank)
    my_images = plan.to_encoders(images, rows=[1] * len(plan.perm))
    my_boxes = None
    if boxes is not None:
        flat = torch.cat([as_box_tensor(b) for b in boxes]).to(images.device, non_blocking=True)
        my_boxes = list(torch.split(plan.to_encoders(flat), [plan.rows[g] for g in mine]))
    out = split_forward(fn, my_images, my_boxes, splits)
    return plan.to_owners(out)

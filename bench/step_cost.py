"""Cost of one pretraining step of every method against MoCo-v2, same R50, batch, input.

For every method the step time ratio to MoCo-v2 is printed beside its multiply-add ratio (``step
GMACs``: every Conv2d/Linear the step runs, counted by forward hooks, x3 where gradients flow
(forward + backward), x1 in the momentum network), so the overhead our code adds on top of the
method's own arithmetic is the ratio of the two (``overhead``).

One step = forward (query encoder + shuffle-BN key encoder + InfoNCE + enqueue) + backward +
optimizer step + momentum update, exactly what ``SimpleTrainer.run_step`` and the trainer's
``ModelStepHook`` do, with the optimizer ``PretrainTrainer`` builds (SGD, Nesterov for InsLoc). Every model gets its own real mapper's
batch at the same canvas (``--size``; InsLoc: CopyPaste with foreground size [S/2, S), the
official 128-255 of 256; MoCo-v2: TwoCrops), made once and reused, so data time is excluded.
Queues have the real K = 65536. Models are timed in interleaved rounds (order rotated each
round) on a noisy machine; medians over rounds are reported, and each ratio to MoCo-v2 is the
median of the per-round ratios (paired, so slow phases of the machine cancel). Process CPU time
is reported next to wall time: with ``--threads 1`` it is the least sensitive to other jobs.

Also printed: per-section medians (query backbone, query RoI pooling + head, projector,
momentum EMA, key encoder, loss + enqueue, backward, optimizer), forward FLOPs per component
(fvcore, 1 multiply-add = 1 flop) and the queue memory at K = 65536.

    python bench/step_cost.py                       # batch 4, 224 px, 7 rounds
    python bench/step_cost.py --batch 4 --size 224 --rounds 11 --threads 1   # shared machine
"""
import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

import regionssl  # noqa: F401
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.mapper import RegionSSLDatasetMapper
from regionssl.engine import PretrainTrainer, get_regionssl_cfg
from regionssl.modeling.encoders import C4Encoder, FPNEncoder
from regionssl_workbench.recipes import recipe_config, recipes

BASE = "mocov2"  # every step is compared with MoCo-v2's
SECTIONS = ("q_backbone", "q_pool_head", "q_projector", "momentum_ema", "key_encoder", "loss_enqueue", "backward", "optimizer")


def build(name, size, batch):
    opts = ["MODEL.DEVICE", "cpu", "INPUT.REGIONSSL.CROP_SIZE", size, "DATASETS.TRAIN", "('regionssl_demo_images',)",
            "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [size // 2, size - 1], "SOLVER.IMS_PER_BATCH", batch,
            "SOLVER.REFERENCE_WORLD_SIZE", 0]
    cfg = get_regionssl_cfg(recipe_config(name), opts)  # one process: SyncBN runs as plain BN
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = PretrainTrainer.build_optimizer(cfg, model)
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)
    data = [mapper(dicts[i % len(dicts)]) for i in range(batch)]
    return cfg, model, optimizer, data


class Timer:
    """Wraps model parts to accumulate wall time per section for the current step."""

    def __init__(self, model):
        self.t = defaultdict(float)
        self.in_key = False
        self._wrap(model.backbone, "forward", "q_backbone")
        self._wrap(model.encoder, "pool", "q_pool_head")  # the online encoder's RoI pooling + head
        self._wrap(getattr(model, "projector", None), "forward", "q_projector")
        self._wrap(model, "update_momentum", "momentum_ema")
        self._wrap(model, "key_embed", "key_encoder", key=True)  # MoCo-style methods only
        self._wrap(model, "contrastive_losses", "loss_enqueue")

    def _wrap(self, obj, attr, section, skip_in_key=False, key=False):
        fn = getattr(obj, attr, None)
        if fn is None:
            return

        def wrapped(*args, **kwargs):
            if skip_in_key and self.in_key:
                return fn(*args, **kwargs)
            self.in_key |= key
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[section] += time.perf_counter() - start
                self.in_key &= not key

        setattr(obj, attr, wrapped)


def step(model, optimizer, data, timer, iteration=0):
    """One training step (with what ModelStepHook does around it); returns (wall s, process CPU s,
    {section: wall s})."""
    timer.t.clear()
    cpu = time.process_time()
    start = time.perf_counter()
    model.before_step(iteration)
    losses = model(data)
    total = sum(losses.values())
    optimizer.zero_grad()
    t0 = time.perf_counter()
    total.backward()
    t1 = time.perf_counter()
    optimizer.step()
    t2 = time.perf_counter()
    model.after_step()  # EMA (timed as momentum_ema)
    end = time.perf_counter()
    timer.t["backward"], timer.t["optimizer"] = t1 - t0, t2 - t1
    return end - start, time.process_time() - cpu, dict(timer.t)


def step_macs(model, data):
    """Multiply-adds (G) of one training step: every Conv2d/Linear call of a forward, counted by
    hooks, x3 when its weight gets a gradient (forward + input and weight gradients), else x1."""
    total = [0.0]

    def hook(m, inp, out):
        w = m.weight
        per_out = w.shape[1] * (w[0, 0].numel() if isinstance(m, torch.nn.Conv2d) else 1)
        grad = torch.is_grad_enabled() and w.requires_grad
        total[0] += out.numel() * per_out * (3 if grad else 1)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model(data)
        model.load_state_dict(state)  # undo queue/BN-statistics updates of the counting pass
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def flops(model, batch, size):
    """Forward multiply-adds (G) per component for ``batch`` images of one view."""
    x = torch.randn(batch, 3, size, size)
    model.eval()
    out = {}
    with torch.no_grad():
        feats = model.backbone(x)
        count = lambda m, *inp: FlopCountAnalysis(m, inp).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()  # noqa: E731
        trunk = getattr(model.backbone, "bottom_up", model.backbone)
        out["resnet"] = count(trunk, x)
        out["fpn"] = count(model.backbone, x) - out["resnet"] if trunk is not model.backbone else 0.0
        encoder = model.encoder
        if isinstance(encoder, FPNEncoder):
            res = encoder.pooler.aligners[0].output_size[0]
            pooled = torch.randn(len(model.levels) * batch, feats["p2"].shape[1], res, res)
            out["region_head"] = count(model.roi_heads.box_head, pooled)
        elif isinstance(encoder, C4Encoder):
            res = encoder.pooler.aligners[0].output_size[0]
            pooled = torch.randn(batch, feats["res4"].shape[1], res, res)
            out["region_head"] = count(model.roi_heads.res5, pooled)
        z = torch.randn(len(model.levels) * batch, encoder.out_channels)
        out["projector"] = count(model.projector, z)
    model.train()
    d, k = model.queues.queue.shape[1:]
    out["infonce_vs_queue"] = len(model.levels) * batch * d * k
    return {name: v / 1e9 for name, v in out.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {recipes()} (mocov2 always)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [BASE] + [n for n in recipes() if n != BASE and (args.models is None or n in args.models)]
    runs = {n: build(n, args.size, args.batch) for n in names}
    timers = {n: Timer(runs[n][1]) for n in names}
    for n in names:
        for _ in range(args.warmup):
            step(*runs[n][1:], timers[n])
    times, cpus, sections = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t, c, sec = step(*runs[n][1:], timers[n])
            times[n].append(t)
            cpus[n].append(c)
            for s, v in sec.items():
                sections[n][s].append(v)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s (CPU {cpus[n][-1]:.2f}s)" for n in names), flush=True)

    base = BASE
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.size}x{args.size} views, R50, K=65536, {args.rounds} rounds (median)")
    macs = {n: step_macs(runs[n][1], runs[n][3]) for n in names}
    print("| model | wall s/step | wall ratio to MoCo-v2 | CPU s/step | CPU ratio to MoCo-v2 | step GMACs | GMAC ratio | "
          "overhead (CPU ratio / GMAC ratio - 1) | queue buffers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], times[base]))
        cratio = statistics.median(a / b for a, b in zip(cpus[n], cpus[base]))
        q = getattr(runs[n][1], "queues", None)
        qbytes = sum(b.numel() * b.element_size() for b in q.buffers()) if q is not None else 0
        mratio = macs[n] / macs[base]
        print(f"| {n} | {statistics.median(times[n]):.3f} | {ratio:.3f} | {statistics.median(cpus[n]):.3f} | {cratio:.3f} | "
              f"{macs[n]:.1f} | {mratio:.3f} | {cratio / mratio - 1:+.1%} | {qbytes / 2**20:.1f} MiB |")
    print("\nPer-section medians (s); q_* = query forward parts, key_encoder includes shuffle + RoI head + projector")
    print("| model | " + " | ".join(SECTIONS) + " |")
    print("|---|" + "---|" * len(SECTIONS))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{statistics.median(sections[n][s]):.3f}" if sections[n][s] else "-" for s in SECTIONS) + " |")
    names = [n for n in names if getattr(runs[n][1], "queues", None) is not None and hasattr(runs[n][1], "levels")]
    print("\nForward GMACs for one view of the batch, MoCo-style methods (fvcore; a training step ~ 3x query + 1x key forward)")
    rows = {n: flops(runs[n][1], args.batch, args.size) for n in names}
    cols = ("resnet", "fpn", "region_head", "projector", "infonce_vs_queue")
    print("| model | " + " | ".join(cols) + " | total | ratio |")
    print("|---|" + "---|" * (len(cols) + 2))
    base_total = sum(rows[base].values())
    for n in names:
        total = sum(rows[n].values())
        print(f"| {n} | " + " | ".join(f"{rows[n].get(c, 0.0):.2f}" for c in cols) + f" | {total:.2f} | {total / base_total:.2f} |")


if __name__ == "__main__":
    main()

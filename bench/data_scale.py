"""The pretraining data path at ImageNet scale: listing, sampler memory, resume, loader memory,
descriptors and worker start-up at 10k-1M files, beside Detectron2's stock train loader (the path
regionssl used before, "detectron2") and torchvision's ``ImageFolder`` + ``DistributedSampler``
("imagefolder", the official codes' loader) on the same machine.

The images: a synthetic ImageNet layout (``--classes`` class folders) of hard links to a few
500x375 JPEGs, built once per size under ``--root`` (default: a folder in the system's temporary
directory; never inside the repository). Hard links cost a directory entry each, not an inode
or the image's bytes. Every measurement runs in its own fresh process:

* listing: seconds and peak memory to list the tree: ours with an empty cache, ours reading the
  cache, ``ImageFolder``'s constructor;
* sampler: memory one loader worker's sampler holds for its share (peak RSS growth per image, at
  32 and 256 images per worker batch), ours vs Detectron2's per-slot iteration;
* resume: seconds until worker 3 of 8 has its first index at epoch k (Detectron2: measured at
  epoch 1, the cost grows linearly with k);
* loader: ``--workers`` x ``--batch`` (the MoCo-v2 mapper; ImageFolder: two RandomResizedCrop
  views), ``--batches`` batches under ``ulimit -n --nofile``: unique memory (USS) and proportional
  share (PSS) of each worker and of the main process, open descriptors, start to first batch,
  the spread of the workers' start times;
* launch: ``--num-gpus 2`` on CPU (two gloo processes via Detectron2's ``launch``): per process,
  the spread of its workers' start times and the time from launch to its first batch.

    python bench/data_scale.py --sizes 10000 100000 300000 --batches 12   # -> docs/results/data_scale/
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

_START = time.perf_counter()
_TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- the tree
def build_tree(root, size, classes):
    """``root`` = ``classes`` folders of hard links to 8 JPEGs (more past 480k files: ext4 allows
    65,000 links per file), ``size`` files in all (built once)."""
    from regionssl_workbench.atomic import build_once

    def build(folder):
        import numpy as np
        from PIL import Image

        sources = os.path.join(folder, ".sources")
        os.makedirs(sources)
        rng = np.random.RandomState(0)
        paths = []
        for k in range(max(8, -(-size // 60000))):  # smooth random pictures: decode cost of a photo, not of noise
            small = rng.randint(0, 256, (12, 16, 3)).astype(np.uint8)
            path = os.path.join(sources, f"src{k}.jpg")
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
            paths.append(path)
        train = os.path.join(folder, "train")
        for c in range(classes):
            cls = os.path.join(train, f"n{c:08d}")
            os.makedirs(cls)
            for i in range(c, size, classes):
                os.link(paths[i % len(paths)], os.path.join(cls, f"n{c:08d}_{i}.JPEG"))

    build_once(root, f"data_scale tree v1: {size} files in {classes} classes", build)
    return os.path.join(root, "train")


# --------------------------------------------------------------------------------- process memory
def _smaps(pid):
    """{"rss", "pss", "uss"} in MiB of process ``pid`` (/proc/<pid>/smaps_rollup)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.extend(int(c) for c in f.read().split())
    return out


def _start_seconds(pid):
    """Start time of ``pid`` in seconds since boot."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19]) / _TICK


def _open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ------------------------------------------------------------------------------------ child steps
def _in_fork(fn):
    """``fn()`` in a forked copy of this process (nothing it allocates stays here): its result, its
    seconds, and the peak growth of its resident memory in MiB (VmHWM after a reset, minus VmRSS)."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: shares every page of the parent until it writes
        os.close(read)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size to the current one
        base = _status_kib("VmRSS")
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
        with os.fdopen(write, "wb") as f:
            pickle.dump((value, seconds, (_status_kib("VmHWM") - base) / 1024), f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def _list_ours(root, cache):
    os.environ["REGIONSSL_CACHE_DIR"] = cache
    from regionssl.data.build import get_pretrain_dataset_dicts

    return len(get_pretrain_dataset_dicts([f"folder:{root}"]))


def _list_imagefolder(root):
    from torchvision.datasets import ImageFolder

    return len(ImageFolder(root).samples)


def _as_worker(worker, workers):
    import torch

    info = type("Info", (), {"id": worker, "num_workers": workers})
    torch.utils.data.get_worker_info = lambda: info


def _first_batch(path, size, worker, workers, chunk, skip):
    """The indices of a worker's first batch (``chunk`` of them): ours by arithmetic, Detectron2's by
    iterating the stream in each of the ``chunk`` slots."""
    import itertools

    if path == "ours":
        from regionssl.data.sampler import ResumableTrainingSampler

        s = ResumableTrainingSampler(size, seed=0)
        s.resume(0, skip)
        return list(itertools.islice(s.worker_stream(worker, workers, chunk), chunk))
    from detectron2.data.common import _shard_iterator_dataloader_worker
    from detectron2.data.samplers import TrainingSampler

    class Skipping(TrainingSampler):  # the pre-arithmetic ResumableTrainingSampler: islice past `skip`
        def __iter__(self):
            yield from itertools.islice(self._infinite_indices(), self._rank + skip * self._world_size, None,
                                        self._world_size)

    _as_worker(worker, workers)
    return list(itertools.islice(_shard_iterator_dataloader_worker(Skipping(size, seed=0), chunk), chunk))


def child_inproc(a):
    """Listing, sampler memory and resume of one tree, each in a fork of one process (one import)."""
    import functools

    import torchvision.datasets  # noqa: F401  (imported before the forks)

    from regionssl.data.build import get_pretrain_dataset_dicts  # noqa: F401
    from regionssl.data.sampler import ResumableTrainingSampler  # noqa: F401

    import gc

    gc.collect()
    gc.freeze()  # the forks' garbage collector leaves the parent's objects (and their pages) alone
    size, out = a["size"], {"listing": {}, "sampler": {}, "resume": {}}
    for name, fn in (("ours_cold", functools.partial(_list_ours, a["root"], a["cache"])),
                     ("ours_cached", functools.partial(_list_ours, a["root"], a["cache"])),
                     ("imagefolder", functools.partial(_list_imagefolder, a["root"]))):
        files, seconds, peak = _in_fork(fn)
        out["listing"][name] = {"seconds": seconds, "files": files, "peak_growth_mib": peak}
    for path in ("ours", "detectron2"):
        for chunk in (32, 256):
            if path == "detectron2" and size * chunk > a["max_detectron2_slots"]:
                continue
            _, seconds, peak = _in_fork(functools.partial(_first_batch, path, size, 0, 8, chunk, 0))
            out["sampler"][f"{path}_b{chunk}"] = {"peak_growth_mib": peak, "bytes_per_image": peak * 2**20 / size,
                                                  "seconds": seconds}
    for epoch in a["epochs"]:
        _, seconds, peak = _in_fork(functools.partial(_first_batch, "ours", size, 3, 8, 32, epoch * size + 5))
        out["resume"][f"ours_epoch{epoch}"] = {"seconds": seconds, "peak_growth_mib": peak}
    for epoch in (0, 1):
        _, seconds, peak = _in_fork(functools.partial(_first_batch, "detectron2", size, 3, 8, 32, epoch * size + 5))
        out["resume"][f"detectron2_epoch{epoch}"] = {"seconds": seconds, "peak_growth_mib": peak}
    return out


def _moco_cfg(root, workers, batch, world=1):
    from regionssl.engine import get_regionssl_cfg

    return get_regionssl_cfg(os.path.join(REPO, "configs", "mocov2.yaml"), [
        "DATASETS.TRAIN", f"('folder:{root}',)", "DATALOADER.NUM_WORKERS", workers,
        "SOLVER.IMS_PER_BATCH", batch * world, "SOLVER.REFERENCE_WORLD_SIZE", 0, "MODEL.DEVICE", "cpu"])


class _TwoViews:
    def __init__(self):
        from torchvision import transforms as T

        self.t = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])

    def __call__(self, image):
        return [self.t(image), self.t(image)]


def _loader(path, root, workers, batch, world=1, rank=0):
    import torch

    if path == "ours":
        from regionssl.data.build import build_pretrain_train_loader

        return build_pretrain_train_loader(_moco_cfg(root, workers, batch, world))
    if path == "detectron2":
        from detectron2.data import build_detection_train_loader
        from detectron2.data.samplers import TrainingSampler

        from regionssl.data.build import get_pretrain_dataset_dicts
        from regionssl.data.mapper import RegionSSLDatasetMapper

        dicts = get_pretrain_dataset_dicts([f"folder:{root}"])
        cfg = _moco_cfg(root, workers, batch, world)
        return build_detection_train_loader(dicts, mapper=RegionSSLDatasetMapper(cfg, dataset_dicts=dicts),
                                            sampler=TrainingSampler(len(dicts), seed=0), total_batch_size=batch * world,
                                            aspect_ratio_grouping=False, num_workers=workers)
    from torch.utils.data.distributed import DistributedSampler
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(root, transform=_TwoViews())
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)


def child_loader(a):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(a["nofile"], hard), hard))
    os.environ["REGIONSSL_CACHE_DIR"] = a["cache"]
    out = {"ok": True}
    t0 = time.perf_counter()
    try:
        batches = iter(_loader(a["path"], a["root"], a["workers"], a["batch"]))
        held, fds = [], []
        for k in range(a["batches"]):
            held.append(next(batches))
            if k == 0:
                out["first_batch_s"] = time.perf_counter() - t0
                out["since_start_s"] = time.perf_counter() - _START
            held = held[-2:]  # a training step holds its batch (and the next is being fetched)
            time.sleep(a["pause"])  # let the workers fill the prefetch queue, as a slow step does
            fds.append(_open_fds(os.getpid()))
        pids = _children(os.getpid())
        workers = [_smaps(p) for p in pids]
        starts = [_start_seconds(p) for p in pids]
        out.update(
            main=_smaps(os.getpid()), workers=len(pids),
            worker_uss_mib=max(w["uss"] for w in workers), worker_pss_mib=sum(w["pss"] for w in workers) / len(workers),
            main_fds_max=max(fds), worker_start_spread_s=max(starts) - min(starts),
        )
    except Exception as e:  # the reference crashing under the descriptor limit is a result
        out.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out


def _launched(a, queue_dir):
    from detectron2.utils import comm

    t_rank = time.time()
    batches = iter(_loader(a["path"], a["root"], a["workers"], a["batch"], world=2, rank=comm.get_rank()))
    next(batches)
    first = time.time()
    starts = [_start_seconds(p) for p in _children(os.getpid())]
    with open(os.path.join(queue_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"rank_start_to_first_batch_s": first - t_rank, "launch_to_first_batch_s": first - a["t_launch"],
                   "worker_start_spread_s": max(starts) - min(starts), "workers": len(starts)}, f)


def child_launch(a):
    from detectron2.engine import launch

    os.environ["REGIONSSL_CACHE_DIR"] = a["cache"]
    with tempfile.TemporaryDirectory() as tmp:
        a["t_launch"] = time.time()
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch(_launched, 2, dist_url=f"tcp://127.0.0.1:{port}", args=(a, tmp))
        ranks = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return {"ranks": ranks}


CHILDREN = {"inproc": child_inproc, "loader": child_loader,
            "launch": child_launch}


def run_child(kind, args, timeout=1800):
    """One measurement in a fresh process; its result dict (or {"ok": False, "error": ...})."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(args)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------ report
def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def measure(args):
    results = {"machine": f"{os.cpu_count()} CPUs", "workers": args.workers, "batch": args.batch, "nofile": args.nofile,
               "sizes": {}}
    if os.path.exists(os.path.splitext(args.out)[0] + ".json"):  # add to the sizes measured before
        with open(os.path.splitext(args.out)[0] + ".json") as f:
            results = json.load(f)
    for size in args.sizes:
        root = build_tree(os.path.join(args.root, f"tree_{size}"), size, args.classes)
        cache = tempfile.mkdtemp(prefix="listing-cache-", dir=args.root)
        r = results["sizes"].setdefault(str(size), {})
        print(f"[data_scale] {size} files", flush=True)
        if "inproc" in args.stages:
            r.update(run_child("inproc", {"root": root, "cache": cache, "size": size, "epochs": args.epochs,
                                          "max_detectron2_slots": args.max_detectron2_slots}))
        loader = {"root": root, "cache": cache, "workers": args.workers, "batch": args.batch, "batches": args.batches,
                  "nofile": args.nofile, "pause": args.pause}
        if "loader" in args.stages:
            r["loader"] = {p: run_child("loader", dict(loader, path=p)) for p in ("ours", "detectron2", "imagefolder")
                           if p != "detectron2" or size * args.batch <= args.max_detectron2_slots}
        print(json.dumps(r, indent=1), flush=True)
        _save(results, args.out)  # what is measured so far survives a later failure
    if "launch" not in args.stages:
        return results
    size = max(args.sizes)
    root = build_tree(os.path.join(args.root, f"tree_{size}"), size, args.classes)
    launch = {"root": root, "cache": tempfile.mkdtemp(prefix="listing-cache-", dir=args.root),
              "workers": args.launch_workers, "batch": args.batch // 4}
    results["launch"] = {"size": size, "workers": args.launch_workers, "batch": args.batch // 4,
                         **{p: run_child("launch", dict(launch, path=p)) for p in ("ours", "imagefolder")}}
    print(json.dumps(results["launch"], indent=1), flush=True)
    _save(results, args.out)
    return results


def _save(results, out):
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)


def _rows(results, key):
    """(size, that size's ``key`` results) for the sizes measured with ``key``, ascending."""
    return [(int(n), r[key]) for n, r in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])) if key in r]


def _slope(rows, key, field):
    """MiB -> bytes per added image of ``field`` between the smallest and the largest size."""
    pts = [(n, x[key][field]) for n, x in rows if key in x and field in x[key]]
    if len(pts) < 2:
        return None
    (n0, a), (n1, b) = pts[0], pts[-1]
    return (b - a) * 2**20 / (n1 - n0)


def report(results):
    w, b = results["workers"], results["batch"]
    lines = [f"# Data path at scale ({results['machine']}; {w} workers x {b} images per worker batch)", "",
             "Measured by `bench/data_scale.py` on hard-linked 500x375 JPEGs in 1000 class folders. *ours*: "
             "`build_pretrain_train_loader`; *detectron2*: Detectron2's `build_detection_train_loader` + "
             "`TrainingSampler` with the same MoCo-v2 mapper (the loader before); *imagefolder*: torchvision "
             "`ImageFolder` + `DistributedSampler` + `DataLoader` (two RandomResizedCrop views). Seconds are wall "
             "time on a shared machine: compare within a row.", ""]
    listing = _rows(results, "listing")
    if listing:
        lines += ["## Listing (seconds; peak memory growth MiB)", "",
                  "| files | ours, no cache | ours, cached | ImageFolder |", "|---:|---:|---:|---:|"]
        for n, x in listing:
            cells = [f"{_fmt(x[k].get('seconds'), 2)}; {_fmt(x[k].get('peak_growth_mib'), 0)}"
                     for k in ("ours_cold", "ours_cached", "imagefolder")]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    sampler = _rows(results, "sampler")
    if sampler:
        keys = ("ours_b32", "ours_b256", "detectron2_b32", "detectron2_b256")
        lines += ["", "## Sampler of one loader worker (worker 0 of 8): peak memory growth (MiB) for its first batch", "",
                  "| files | ours, 32/batch | ours, 256/batch | detectron2, 32/batch | detectron2, 256/batch |",
                  "|---:|---:|---:|---:|---:|"]
        for n, x in sampler:
            lines.append(f"| {n:,} | " + " | ".join(_fmt(x.get(k, {}).get("peak_growth_mib")) for k in keys) + " |")
        lines.append("| bytes per added image | " + " | ".join(_fmt(_slope(sampler, k, "peak_growth_mib")) for k in keys)
                     + " |")
    resume = _rows(results, "resume")
    if resume:
        epochs = sorted({int(k.split("epoch")[1]) for _, x in resume for k in x if k.startswith("ours")})
        lines += ["", "## Resume: seconds until worker 3 of 8 has its first batch of 32 indices at epoch k", "",
                  "| files | " + " | ".join(f"ours, epoch {e}" for e in epochs)
                  + " | detectron2, epoch 0 | detectron2, epoch 1 | detectron2, epoch 100 (101 x epoch 1 / 2) |",
                  "|---:|" + "---:|" * (len(epochs) + 3)]
        for n, x in resume:
            cells = [_fmt(x[f"ours_epoch{e}"].get("seconds"), 2) for e in epochs]
            d0, d1 = (x[f"detectron2_epoch{e}"].get("seconds") for e in (0, 1))
            # reaching epoch 1 iterates two epochs' lists in every slot, epoch 100 101 of them
            cells += [_fmt(d0, 2), _fmt(d1, 2), _fmt(None if d1 is None else 101 * d1 / 2, 0)]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    loader = _rows(results, "loader")
    if loader:
        lines += ["", f"## Loader: {w} workers x {b} images under `ulimit -n {results.get('nofile', 1024)}`", "",
                  "| files | loader | ran | worker USS MiB (max) | worker PSS MiB (mean) | main RSS MiB | main fds (max) | "
                  "start to 1st batch s | worker start spread s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for n, x in loader:
            for p, y in x.items():
                main = y.get("main", {})
                lines.append(f"| {n:,} | {p} | {'yes' if y.get('ok') else y.get('error', 'no')} | "
                             f"{_fmt(y.get('worker_uss_mib'))} | {_fmt(y.get('worker_pss_mib'))} | {_fmt(main.get('rss'), 0)} | "
                             f"{y.get('main_fds_max', '-')} | {_fmt(y.get('first_batch_s'), 1)} | "
                             f"{_fmt(y.get('worker_start_spread_s'), 2)} |")
    la = results.get("launch")
    if la:
        lines += ["", f"## Two processes (`--num-gpus 2` on CPU), {la['workers']} workers each, {la['size']:,} files", "",
                  "| loader | rank | worker start spread s | launch to 1st batch s |", "|---|---:|---:|---:|"]
        for p in ("ours", "imagefolder"):
            x = la[p]
            for rank, rr in enumerate(x.get("ranks", [])):
                lines.append(f"| {p} | {rank} | {_fmt(rr['worker_start_spread_s'], 2)} | {_fmt(rr['launch_to_first_batch_s'], 1)} |")
            if "ranks" not in x:
                lines.append(f"| {p} | - | {x.get('error')} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 300000])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "regionssl_data_scale"),
                    help="where the synthetic trees are built (kept for the next run)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="images per worker batch")
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds the consumer spends per batch")
    ap.add_argument("--nofile", type=int, default=1024, help="the descriptor limit (ulimit -n) of the loader runs")
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 10, 100, 800])
    ap.add_argument("--launch-workers", type=int, default=4)
    ap.add_argument("--max-detectron2-slots", type=float, default=1.1e7,
                    help="skip Detectron2's loader where files x batch exceeds this (40 B each per worker)")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "results", "data_scale", "data_scale.md"))
    ap.add_argument("--stages", nargs="+", default=["inproc", "loader", "launch"], choices=["inproc", "loader", "launch"],
                    help="inproc: listing, sampler memory, resume; loader: the three loaders; launch: two processes")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the saved JSON")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, payload = args.child
        print("RESULT " + json.dumps(CHILDREN[kind](json.loads(payload))), flush=True)
        return
    os.makedirs(args.root, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.report_only:
        with open(os.path.splitext(args.out)[0] + ".json") as f:
            results = json.load(f)
    else:
        results = measure(args)
    text = report(results)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

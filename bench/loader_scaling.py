"""Data-loader throughput with 1 and 2 worker processes: the real Detectron2 train loader
(``build_pretrain_train_loader``) over JPEG photos, per recipe, in pairs (samples) per wall second.

Photos as in bench/mapper_throughput.py (the demo photos at ``--size``, JPEG q90). For each recipe and
worker count the loader is built, warmed up (``--warmup`` batches: worker start, first decodes),
then ``--batches`` batches of ``--batch`` samples are timed. Wall time on a shared machine: read the
ratio between worker counts; a worker's own rate is bench/mapper_throughput.py's.

    python bench/loader_scaling.py --workers 1 2 --size 640x480 --batch 32 --batches 6
"""
import argparse
import os
import platform
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every recipe (regionssl_workbench.recipes)")
    args = ap.parse_args()
    from regionssl_workbench.recipes import recipe_config, recipes
    from regionssl_workbench.scripts import load_script

    make_photos = load_script(os.path.join(REPO, "bench", "mapper_throughput.py")).make_photos

    from regionssl.data import build_pretrain_train_loader
    from regionssl.engine import get_regionssl_cfg

    w, h = (int(v) for v in args.size.split("x"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.size} JPEGs, batch {args.batch}")
    print("| recipe | " + " | ".join(f"{n} worker(s), pairs/s" for n in args.workers) + " | scaling |")
    print("|---|" + "---:|" * (len(args.workers) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(tmp, (w, h))
        for recipe in args.recipes or recipes():
            rates = []
            for n in args.workers:
                cfg = get_regionssl_cfg(recipe_config(recipe), [
                    "DATASETS.TRAIN", f"('folder:{tmp}',)", "DATALOADER.NUM_WORKERS", n, "SOLVER.IMS_PER_BATCH", args.batch,
                    "SOLVER.REFERENCE_WORLD_SIZE", 0, "MODEL.DEVICE", "cpu"])
                it = iter(build_pretrain_train_loader(cfg))
                for _ in range(args.warmup):
                    next(it)
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    assert len(next(it)) == args.batch
                rates.append(args.batch * args.batches / (time.perf_counter() - t0))
                del it
            print(f"| {recipe} | " + " | ".join(f"{r:.0f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Run every benchmark under ``bench/`` with short settings; write each one's report to a file.

    python bench/run_all.py                    # short settings (a few minutes on 2 cores)
    python bench/run_all.py --full             # the settings of the figures in docs/performance.md
    python bench/run_all.py --out output/bench --only mapper

Each benchmark runs as its own process (it pins CPUs and thread counts for itself), one after
the other, never in parallel: the ratios they report are only meaningful on an otherwise quiet
core. Short settings give rough ratios for a smoke check; quote numbers only from ``--full`` runs
(see ``docs/performance.md`` for what they mean).
"""
import argparse
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

# name -> (script, short arguments, full arguments)
BENCHMARKS = {
    "mapper_throughput": (
        "mapper_throughput.py",
        ["--sizes", "640x480", "--rounds", "3", "--pairs", "20"],
        ["--rounds", "5", "--pairs", "40"],
    ),
    # where a sample's time goes, stage by stage (InsLoc, the pipeline under 2x of its reference)
    "mapper_breakdown": (
        "mapper_breakdown.py",
        ["--sizes", "640x480", "--samples", "40"],
        ["--samples", "300"],
    ),
    "step_cost": (
        "step_cost.py",
        ["--batch", "2", "--size", "128", "--rounds", "1", "--warmup", "1", "--threads", "1"],
        ["--batch", "4", "--size", "224", "--rounds", "11", "--threads", "1"],
    ),
    # the miniature transfer protocol; short: its model and sizes on the tiny synthetic COCO set (no
    # build step), full: on regionssl_minidet (python tools/build_detection_set.py first)
    "finetune_cost": (
        "finetune_cost.py",
        ["--config-file", "configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml", "--threads", "1", "--rounds", "1",
         "--iters", "2", "--images", "4", "DATASETS.TRAIN", "('regionssl_tiny_coco_train',)",
         "DATASETS.TEST", "('regionssl_tiny_coco_val',)", "INPUT.MASK_FORMAT", "polygon"],
        ["--config-file", "configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml", "--threads", "1", "--rounds", "2",
         "--iters", "3", "--images", "8"],
    ),
    # the data path at ImageNet scale (synthetic hard-linked trees in the temporary folder; the full
    # run builds 1.69M links, ~4 GB of directory entries, and takes about an hour on 2 busy cores)
    "data_scale": (
        "data_scale.py",
        ["--sizes", "2000", "--classes", "20", "--workers", "2", "--batch", "8", "--batches", "4", "--pause", "0.05",
         "--epochs", "0", "10", "--launch-workers", "2", "--out", "output/bench/DATA_SCALE_short.md"],
        ["--sizes", "10000", "100000", "300000", "1280000", "--batches", "12"],
    ),
}


def run(name, script, args, out_dir):
    """Run one benchmark, tee its output to ``<out_dir>/<name>.txt``; returns (exit code, path, seconds)."""
    path = os.path.join(out_dir, f"{name}.txt")
    cmd = [sys.executable, os.path.join(BENCH, script), *args]
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(path, "w") as log:
        log.write(f"# {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    return code, path, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "output", "bench"), help="folder for the reports")
    ap.add_argument("--full", action="store_true", help="the long settings of the published numbers")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of benchmark names to run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in BENCHMARKS if not args.only or any(s in n for s in args.only)]
    if not names:
        ap.error(f"--only {args.only} matches none of {list(BENCHMARKS)}")
    results = []
    for name in names:
        script, short, full = BENCHMARKS[name]
        results.append((name, *run(name, script, full if args.full else short, args.out)))
    print("\n================ regionssl benchmarks ================")
    for name, code, path, seconds in results:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name:18s}: {status}, {seconds:.0f} s -> {path}")
    return max(code for _, code, _, _ in results)


if __name__ == "__main__":
    sys.exit(main())

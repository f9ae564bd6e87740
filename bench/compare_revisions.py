"""One benchmark, two revisions of the repository, side by side: is a change slower?

Exports ``--base`` (a git revision) into a temporary folder, then runs the same benchmark script
from that tree and from this working tree alternately (base, this, this, base, ...: the order
flips every round, so a slow phase of a shared machine hits both), ``--rounds`` times each, one
benchmark round per run. Each side imports its own ``regionssl`` (its tree first on ``PYTHONPATH``). Reported per row of the benchmark: the median over runs of each side and the
median of the paired per-round ratios this / base (> 1: this tree is faster for throughputs,
slower for times).

    python bench/compare_revisions.py --base main mapper --sizes 640x480 --pairs 40
    python bench/compare_revisions.py --base main step --batch 2 --size 128 --threads 1

``mapper`` compares ``bench/mapper_throughput.py`` (pairs per CPU-second per pipeline, and each
pipeline's ratio to the torchvision two-crop baseline measured in the same run, which cancels the
machine's speed between runs), ``step`` compares ``bench/step_cost.py`` (CPU seconds per step per
model, and each model's ratio to MoCo-v2 in the same run); arguments after the benchmark name go to
the script (one benchmark round per run unless they say ``--rounds``).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = {
    # name: (script, extra args for one round, row regex -> (row name, value), unit, higher is better)
    "mapper": ("bench/mapper_throughput.py", ["--rounds", "1"],
               re.compile(r"^(\S+)\s+(.+?)\s+([\d.]+) pairs/CPU-s \S+ x([\d.]+)"), "pairs/CPU-s", True),
    "step": ("bench/step_cost.py", ["--rounds", "1", "--warmup", "1"],
             re.compile(r"^\| ([^|]+?) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| [\d,]+ B"), "CPU s/step", False),
}


def parse(bench, text):
    """{row name: (value, value relative to the run's baseline row)} from a benchmark's output."""
    rows = {}
    pattern = BENCHES[bench][2]
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            *name, value, relative = m.groups()
            rows[" ".join(name)] = (float(value), float(relative))
    return rows


def run(tree, bench, args):
    script, fixed = BENCHES[bench][:2]
    path = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)  # before the installed copy
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path)
    out = subprocess.run([sys.executable, os.path.join(tree, script)] + fixed + args, cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return parse(bench, out.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6, help="runs of each side")
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    args = parser.parse_args(argv)
    unit, higher_better = BENCHES[args.bench][3:]
    with tempfile.TemporaryDirectory(prefix="regionssl-base-") as base:
        archive = subprocess.run(["git", "-C", REPO, "archive", args.base], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        results = {"base": [], "this": []}
        for r in range(args.rounds):
            for side in (("base", "this") if r % 2 == 0 else ("this", "base")):
                results[side].append(run(base if side == "base" else REPO, args.bench, args.args))
            print(f"round {r}: " + ", ".join(f"{k} {len(v[-1])} rows" for k, v in results.items()), flush=True)
    rows = [name for name in results["this"][0] if all(name in res for res in results["base"] + results["this"])]
    print(f"\n{args.bench}: this tree vs {args.base}, {args.rounds} runs each, interleaved; {unit}, medians")
    print(f"| row | {args.base} | this | this / {args.base} | same, relative to the run's baseline row |")
    print("|---|---:|---:|---:|---:|")
    for name in rows:
        a = [res[name] for res in results["base"]]
        b = [res[name] for res in results["this"]]
        ratio = statistics.median(y[0] / x[0] for x, y in zip(a, b))
        relative = statistics.median(y[1] / x[1] for x, y in zip(a, b))
        print(f"| {name} | {statistics.median(x[0] for x in a):.3f} | {statistics.median(y[0] for y in b):.3f} | "
              f"{ratio:.3f} | {relative:.3f} |")
    print("(ratios: medians of the paired per-run ratios)")
    print("(throughput: a ratio > 1 is faster)" if higher_better else "(time: a ratio < 1 is faster)")


if __name__ == "__main__":
    main()

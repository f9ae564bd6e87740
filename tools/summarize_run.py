#!/usr/bin/env python
"""Print the outcome of a pretrain -> fine-tune run: what the pretraining learned (the retrieval
probe beside random init, when given tools/probe.py's JSON), box/mask AP (beside random init when
given a tools/transfer.py result) and where everything was written."""
import argparse
import glob
import json
import math
import os
import sys


def last_metrics(output_dir):
    """Merged scalars of Detectron2's metrics.json (later lines win)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: did the run finish?")
    merged = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                merged.update(json.loads(line))
    return merged, path


def transfer_rows(path):
    """(name, kind, results of seed 0 or the first seed) per model of a tools/transfer.py JSON."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for m in data["models"]:
        first = next(iter(m["runs"].values()))
        rows.append((m["name"], m["kind"], first["results"], first["seed"]))
    return rows, data


def _ap(results, kind):
    v = results.get(kind, {}).get("AP")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def print_comparison(rows):
    """Fine-tuned AP of each model, then what the pretrained model gained over random init."""
    labels = [f"{name} (seed {seed})" if kind != "random" else f"random init (seed {seed})"
              for name, kind, _, seed in rows]
    width = max(len(label) for label in labels)
    print(f"{'fine-tuned from':{width}s}  box AP (AP50, AP75)    mask AP (AP50, AP75)")
    for label, (name, kind, res, seed) in zip(labels, rows):
        cells = []
        for k in ("bbox", "segm"):
            ap = _ap(res, k)
            cells.append("missing" if ap is None else
                         f"{ap:6.2f} ({res[k].get('AP50', float('nan')):.1f}, {res[k].get('AP75', float('nan')):.1f})")
        print(f"{label:{width}s}  {cells[0]:22s} {cells[1]}")
    base = next((r for r in rows if r[1] == "random"), None)
    for name, kind, res, _ in rows:
        if base is None or kind == "random":
            continue
        gains = []
        for k, label in (("bbox", "box"), ("segm", "mask")):
            a, b = _ap(res, k), _ap(base[2], k)
            if a is not None and b is not None:
                gains.append(f"{a - b:+.2f} {label} AP")
        print(f"AP difference: {', '.join(gains)} ({name} vs random init, one seed). A run this short checks the "
              "plumbing; AP gains from pretraining need the transfer benchmark's budget (docs/transfer.md)")
    return all(_ap(res, k) is not None for _, _, res, _ in rows for k in ("bbox", "segm"))


def probe_gain(path):
    """Lines on the retrieval probe of tools/probe.py --random-init --output-json: region top-1 of the
    checkpoint and of random initialisation per seed, and the paired gain (same views per seed)."""
    with open(path) as f:
        data = json.load(f)
    res, seeds = data["results"], [str(s) for s in data["seeds"]]
    if "checkpoint" not in res or "random init" not in res:
        raise ValueError(f"{path}: needs the checkpoint and random-init columns (tools/probe.py --random-init)")
    ours = [res["checkpoint"][s]["top1"] for s in seeds]
    rand = [res["random init"][s]["top1"] for s in seeds]
    gains = [a - b for a, b in zip(ours, rand)]
    first = res["checkpoint"][seeds[0]]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return [
        f"region top-1 on held-out {data['dataset']} ({int(first['num_queries'])} queries per seed, "
        f"chance {first['chance']:.3f}): pretrained {mean(ours):.3f}, random init {mean(rand):.3f}",
        f"pretraining bought {mean(gains):+.3f} region top-1 (paired: same views, seeds {', '.join(seeds)}; "
        f"{sum(g > 0 for g in gains)} of {len(gains)} seeds above random init)",
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pretrain", required=True)
    p.add_argument("--finetune", default=None, help="one fine-tuning run directory")
    p.add_argument("--transfer", default=None, help="transfer.json of tools/transfer.py (pretrained vs random)")
    p.add_argument("--probe", default=None, help="JSON of tools/probe.py --random-init --output-json")
    p.add_argument("--pictures", default=None)
    args = p.parse_args(argv)
    if not (args.finetune or args.transfer):
        p.error("give --finetune and/or --transfer")
    pre, pre_path = last_metrics(args.pretrain)
    losses = {k: v for k, v in pre.items() if k.startswith("loss_")}
    print("\n================ regionssl demo ================")
    print(f"pretraining : {len(losses)} losses at iter {pre.get('iteration')}: "
          + ", ".join(f"{k}={v:.3f}" for k, v in sorted(losses.items())))
    accs = {k.split("/")[-1]: v for k, v in pre.items() if k.startswith("regionssl/acc_")}
    if accs:
        # contrastive top-1 accuracy among 1 positive + K queue negatives (chance = 1 / (K + 1))
        print("              contrastive top-1 accuracy (last step; chance = 1/(1+K) with K queued keys): " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(accs.items())))
        fill = [v for k, v in pre.items() if k.startswith("regionssl/queue_fill")]
        if fill and min(fill) < 1:
            # a newcomer reads a rising loss as failure: while the queue fills, K (and ln(K+1)) grows
            print(f"              the key queue is {100 * min(fill):.0f}% full: each step still adds negatives, so the "
                  "loss may rise; this short run checks the plumbing (docs/learning.md shows learning)")
    if args.probe:
        print("probe       : " + "\n              ".join(probe_gain(args.probe)))
    skipped = pre.get("regionssl/skipped_images")
    if skipped is not None:
        names = os.path.join(args.pretrain, "skipped_images.txt")
        print(f"skipped     : {int(skipped)} unreadable image files" + (f" (names: {names})" if skipped else ""))
    paths = [pre_path]
    if args.finetune:
        fin, fin_path = last_metrics(args.finetune)
        paths.append(fin_path)
        for kind in ("bbox", "segm"):
            ap = fin.get(f"{kind}/AP")
            if ap is None or (isinstance(ap, float) and math.isnan(ap)):
                print(f"{kind:5s} AP    : missing in {fin_path}")
                return 1
            print(f"{kind:5s} AP    : {ap:.2f}  (AP50 {fin.get(f'{kind}/AP50', float('nan')):.2f}, "
                  f"AP75 {fin.get(f'{kind}/AP75', float('nan')):.2f})")
    if args.transfer:
        rows, _ = transfer_rows(args.transfer)
        if not print_comparison(rows):
            print(f"AP missing in {args.transfer}")
            return 1
        paths.append(args.transfer)
    if args.probe:
        paths.append(args.probe)
    print("metrics     : " + "\n              ".join(paths))
    print(f"tensorboard : tensorboard --logdir {os.path.dirname(os.path.abspath(args.pretrain))}")
    if args.pictures:
        pngs = sorted(glob.glob(os.path.join(args.pictures, "*.png")))
        print(f"pictures    : {len(pngs)} PNGs in {args.pictures}")
    print(f"checkpoint  : {os.path.join(args.pretrain, 'model_final.pth')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Print the outcome of a pretrain -> fine-tune run: box/mask AP and where everything was written."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pretrain", required=True)
    p.add_argument("--finetune", required=True)
    p.add_argument("--pictures", default=None)
    args = p.parse_args(argv)
    pre, pre_path = last_metrics(args.pretrain)
    fin, fin_path = last_metrics(args.finetune)
    losses = {k: v for k, v in pre.items() if k.startswith("loss_")}
    print("\n================ regionssl demo ================")
    print(f"pretraining : {len(losses)} losses at iter {pre.get('iteration')}: "
          + ", ".join(f"{k}={v:.3f}" for k, v in sorted(losses.items())))
    accs = {k.split("/")[-1]: v for k, v in pre.items() if k.startswith("regionssl/acc_")}
    if accs:
        # contrastive top-1 accuracy among 1 positive + K queue negatives (chance = 1 / (K + 1))
        print("              contrastive top-1 accuracy (last step; chance = 1/(1+K) with K queued keys): " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(accs.items())))
    skipped = pre.get("regionssl/skipped_images")
    if skipped is not None:
        names = os.path.join(args.pretrain, "skipped_images.txt")
        print(f"skipped     : {int(skipped)} unreadable image files" + (f" (names: {names})" if skipped else ""))
    for kind in ("bbox", "segm"):
        ap = fin.get(f"{kind}/AP")
        if ap is None or (isinstance(ap, float) and math.isnan(ap)):
            print(f"{kind:5s} AP    : missing in {fin_path}")
            return 1
        print(f"{kind:5s} AP    : {ap:.2f}  (AP50 {fin.get(f'{kind}/AP50', float('nan')):.2f}, "
              f"AP75 {fin.get(f'{kind}/AP75', float('nan')):.2f})")
    print(f"metrics     : {pre_path}\n              {fin_path}")
    print(f"tensorboard : tensorboard --logdir {os.path.dirname(os.path.abspath(args.pretrain))}")
    if args.pictures:
        pngs = sorted(glob.glob(os.path.join(args.pictures, "*.png")))
        print(f"pictures    : {len(pngs)} PNGs in {args.pictures}")
    print(f"checkpoints : {os.path.join(args.pretrain, 'model_final.pth')}\n"
          f"              {os.path.join(args.finetune, 'model_final.pth')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

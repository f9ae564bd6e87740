#!/usr/bin/env python
"""Build the small real-object detection set ``regionssl_minidet_{train,val}`` (idempotent).

    python tools/build_detection_set.py            # photo pool + tuxpaint stamps -> datasets/regionssl_minidet

Photographic cut-outs with alpha masks from Debian's ``tuxpaint-stamps-default`` (GPL-2; installed
with apt-get when missing, never copied into the repository) are pasted onto crops of real photos:
training images on ``regionssl_photos_train`` (the pretraining pool), validation images on
``regionssl_photos_detval`` (photos no pretraining split contains). A cut-out file is used by one
split only. Masks and boxes are exact by construction (regionssl_workbench/minidet.py). A second run
with the same inputs does nothing; ``--force`` rebuilds. Prints the instance counts per class.
"""
import argparse
import os
import shutil
import subprocess
import sys

STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS_ROOT = "/usr/share/tuxpaint/stamps"


def install_stamps(stamps_root):
    """apt-get install the stamps package if ``stamps_root`` is missing (root only)."""
    if os.path.isdir(stamps_root):
        return
    apt = shutil.which("apt-get")
    if apt is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        sys.exit(f"{stamps_root} not found. Install the cut-outs first: sudo apt-get install -y {STAMPS_PACKAGE} "
                 "(or give --stamps FOLDER).")
    print(f"[minidet] installing {STAMPS_PACKAGE} (about 160 MB) with apt-get")
    cmd = [apt, "install", "-y", "--no-install-recommends", STAMPS_PACKAGE]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.call(cmd, env=env) != 0:  # package lists may be missing or stale
        subprocess.call([apt, "update"], env=env)
        if subprocess.call(cmd, env=env) != 0:
            sys.exit(f"apt-get install {STAMPS_PACKAGE} failed; install it by hand or give --stamps FOLDER.")
    if not os.path.isdir(stamps_root):
        sys.exit(f"{STAMPS_PACKAGE} is installed but {stamps_root} does not exist; give --stamps FOLDER.")


def background_files(name):
    """Image paths of a registered image dataset (or ``folder:/path``), with one clear error."""
    from detectron2.data import DatasetCatalog

    from regionssl.data.datasets import ensure_registered

    try:
        ensure_registered([name])
        return [d["file_name"] for d in DatasetCatalog.get(name)]
    except (KeyError, FileNotFoundError, ValueError) as e:
        hint = "" if "build_photo_pool" in str(e) else " Build the photo pool first: python tools/build_photo_pool.py"
        sys.exit(f"Background dataset {name!r} is not available: {e}{hint}")


def main(argv=None):
    from regionssl_workbench.minidet import CLASSES, build_minidet, default_root

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help=f"output folder (default: {default_root()})")
    p.add_argument("--stamps", default=STAMPS_ROOT, help="folder of RGBA cut-outs (default: %(default)s)")
    p.add_argument("--train-backgrounds", default="regionssl_photos_train", help="dataset name or folder:/path")
    p.add_argument("--val-backgrounds", default="regionssl_photos_detval", help="dataset name or folder:/path")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = p.parse_args(argv)

    import regionssl  # noqa: F401  (registers the photo datasets)

    install_stamps(args.stamps)
    root = args.root or default_root()
    manifest, built = build_minidet(root, args.stamps, background_files(args.train_backgrounds),
                                    background_files(args.val_backgrounds), args.num_train, args.num_val,
                                    args.seed, force=args.force)
    print(("[minidet] built " if built else "[minidet] up to date: ") + os.path.abspath(root))
    header = f"{'split':6s} {'images':>6s} " + " ".join(f"{c:>8s}" for c in CLASSES) + f" {'cut-outs':>9s} {'backgrounds':>11s}"
    print(header)
    for split, entry in manifest["splits"].items():
        inst = entry["instances"]
        cuts = sum(len(v) for v in entry["cutouts"].values())
        print(f"{split:6s} {entry['images']:6d} " + " ".join(f"{inst[c]:8d}" for c in CLASSES)
              + f" {cuts:9d} {len(entry['backgrounds']):11d}")
    print("registered as regionssl_minidet_train / regionssl_minidet_val; manifest: "
          + os.path.join(os.path.abspath(root), "manifest.json"))
    return manifest


if __name__ == "__main__":
    main()

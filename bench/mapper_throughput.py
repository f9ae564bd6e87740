"""Data-pipeline throughput on ONE core: regionssl's mapper vs the torchvision two-crop pipeline.

Measures view-pairs per second (one sample = one image -> its views + boxes) for every view
generator with its region sampler, side by side with the MoCo-v2 "aug+" torchvision pipeline the
official repositories use (MoCo, ReSim, InsLoc's pixel augmentations): PIL open + convert,
RandomResizedCrop(224, scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale 0.2,
PIL GaussianBlur sigma ~ U[0.1, 2] p=0.5, flip, ToTensor, twice (no boxes). That pipeline stops at
ToTensor (MoCo also normalises on the CPU; we leave that out, which favours the baseline).
Two more references, built like the official pipelines of the multi-view generators, put the
MultiCrop and CopyPaste rows in context: a torchvision multi-crop (2 x 224 + 6 x 96, SwAV-style)
and InsLoc-style composites (three OpenCV decodes per sample, as ``copy_and_paste.py``).

Inputs are JPEG photos of realistic size: the demo photos of the installed packages
(``regionssl.data.demo_images.demo_image_files``) centre-cropped to 4:3, resized to each ``--sizes`` entry and
saved as JPEG quality 90 in a temporary folder. Pipelines are measured in interleaved rounds
(A, B, C, ... A, B, C, ...); medians over rounds are reported, and the ratio to torchvision is the
median of the per-round ratios. The process is pinned to one CPU and every library runs one
thread, so the primary number is pairs per second of *CPU time* of this process (what one data
loader worker delivers on a core of its own); pairs per second of wall time, which a busy machine
distorts, is printed next to it.

    python bench/mapper_throughput.py                       # default sizes, rounds
    python bench/mapper_throughput.py --sizes 640x480 --rounds 9 --pairs 60
"""
import argparse
import os
import platform
import random
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config file, overrides): each view generator with the sampler its method uses
PIPELINES = {
    "TwoCrops + WholeView (MoCo-v2)": ("configs/mocov2.yaml", []),
    "TwoCrops + IntersectionBoxes (SCRL)": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.REGION_SAMPLER", "IntersectionBoxes"]),
    "TwoCropsSharedFlip + SlidingWindows (ReSim)": (
        "configs/mocov2.yaml",
        ["INPUT.REGIONSSL.VIEW_GENERATOR", "TwoCropsSharedFlip", "INPUT.REGIONSSL.REGION_SAMPLER", "SlidingWindows",
         "INPUT.REGIONSSL.WINDOWS.SIZES", "[48, 32]", "INPUT.REGIONSSL.WINDOWS.STRIDES", "[32, 24]"],
    ),
    "MultiCrop 2x224+6x96 + WholeView (SwAV)": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.VIEW_GENERATOR", "MultiCrop"]),
    "CopyPaste + PastedBox + jitter (InsLoc)": ("configs/insloc_fpn.yaml", []),
    # INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE: the loader decodes and resamples only (geometry)
    "MoCo-v2, photometric on device (geometry only)": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE", "True"]),
    "SwAV MultiCrop, photometric on device (geometry only)": (
        "configs/mocov2.yaml", ["INPUT.REGIONSSL.VIEW_GENERATOR", "MultiCrop", "INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE", "True"]),
    "InsLoc, photometric on device (geometry only)": ("configs/insloc_fpn.yaml", ["INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE", "True"]),
    # ablations: what the JPEG draft decoding and OpenCV resizing contribute
    "ablation: MoCo-v2 without JPEG draft": ("configs/mocov2.yaml", ["INPUT.REGIONSSL.JPEG_DRAFT", "False"]),
    # insloc_fpn.yaml decodes fully and resizes with OpenCV bilinear, as the official code
    "ablation: InsLoc with JPEG draft": ("configs/insloc_fpn.yaml", ["INPUT.REGIONSSL.JPEG_DRAFT", "True"]),
    "ablation: InsLoc with PIL bilinear": ("configs/insloc_fpn.yaml", ["INPUT.REGIONSSL.INTERPOLATION", "bilinear"]),
}
BASELINE = "torchvision two-crop (MoCo-v2 aug+, no boxes)"
# Reference pipelines built like the official ones for the multi-view generators (no boxes either).
REFERENCES = {
    "reference: torchvision multi-crop 2x224+6x96 (SwAV-style)": "multicrop",
    "reference: InsLoc-style copy-paste (cv2 decode x3 + resize, torchvision pixel aug)": "copypaste",
}


def make_photos(folder, size, limit=None):
    """Demo photos centre-cropped to the aspect of ``size`` = (w, h), resized, saved as JPEG q90."""
    from regionssl.data.demo_images import demo_image_files

    w, h = size
    out = []
    for i, path in enumerate(demo_image_files()[:limit]):
        im = Image.open(path).convert("RGB")
        iw, ih = im.size
        scale = min(iw / w, ih / h)
        cw, ch = w * scale, h * scale
        box = (max(0.0, (iw - cw) / 2), max(0.0, (ih - ch) / 2), min(iw, (iw + cw) / 2), min(ih, (ih + ch) / 2))
        dst = os.path.join(folder, f"{w}x{h}_{i}.jpg")
        im.resize((w, h), Image.BICUBIC, box=box).save(dst, quality=90)
        out.append(dst)
    return out


def _pixel_aug(crop=None):
    """MoCo-v2 aug+ after an optional crop transform: jitter, grayscale, PIL blur, flip, ToTensor."""
    import torchvision.transforms as tvt

    class MoCoGaussianBlur:  # moco/loader.py: PIL blur with radius sigma ~ U[0.1, 2]
        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    return tvt.Compose(([crop] if crop is not None else []) + [
        tvt.RandomApply([tvt.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        tvt.RandomGrayscale(p=0.2),
        tvt.RandomApply([MoCoGaussianBlur()], p=0.5),
        tvt.RandomHorizontalFlip(),
        tvt.ToTensor(),
    ])


def _pil_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def torchvision_two_crop():
    """MoCo-v2's TwoCropsTransform(aug+) with torchvision's PIL loader."""
    import torchvision.transforms as tvt

    aug = _pixel_aug(tvt.RandomResizedCrop(224, scale=(0.2, 1.0)))

    def run(path, index):
        img = _pil_loader(path)
        return [aug(img), aug(img)]

    return run


def torchvision_multi_crop():
    """SwAV-style multi-crop (2 x 224 at scale (0.14, 1), 6 x 96 at (0.05, 0.14)), MoCo-v2 pixel aug."""
    import torchvision.transforms as tvt

    augs = [_pixel_aug(tvt.RandomResizedCrop(224, scale=(0.14, 1.0)))] * 2
    augs += [_pixel_aug(tvt.RandomResizedCrop(96, scale=(0.05, 0.14)))] * 6

    def run(path, index):
        img = _pil_loader(path)
        return [aug(img) for aug in augs]

    return run


def insloc_style_copy_paste(files, canvas=256, fg=(128, 255)):
    """InsLoc's data path as its code has it (docs/methods/insloc.md): OpenCV decode of the
    foreground and two random backgrounds, backgrounds resized to canvas x canvas, two crops
    (scale (0.2, 1), ratio (0.5, 2)) rescaled into a random (w, h) in [128, 255) keeping aspect,
    pasted, then PIL pixel augmentation + flip + ToTensor per composite."""
    from regionssl.data.augmentations import sample_resized_crop

    aug = _pixel_aug()

    def read(path):
        return cv2.cvtColor(cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def run(path, index):
        img = read(path)
        h, w = img.shape[:2]
        out = []
        for _ in range(2):
            bg = cv2.resize(read(random.choice(files)), (canvas, canvas), interpolation=cv2.INTER_LINEAR)
            x0, y0, cw, ch = sample_resized_crop(h, w, (0.2, 1.0), (0.5, 2.0))
            tw, th = np.random.randint(fg[0], fg[1], size=2)
            f = min(max(tw, th) / max(cw, ch), min(tw, th) / min(cw, ch))
            nw, nh = min(canvas, max(1, round(cw * f))), min(canvas, max(1, round(ch * f)))
            piece = cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (nw, nh), interpolation=cv2.INTER_LINEAR)
            px, py = np.random.randint(0, canvas - nw + 1), np.random.randint(0, canvas - nh + 1)
            bg[py : py + nh, px : px + nw] = piece
            out.append(aug(Image.fromarray(bg)))
        return out

    return run


def regionssl_mapper(config, opts, files):
    from regionssl.data import RegionSSLDatasetMapper
    from regionssl.engine import get_regionssl_cfg

    cfg = get_regionssl_cfg(os.path.join(REPO, config), opts)
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=[{"file_name": f, "image_id": i} for i, f in enumerate(files)])

    def run(path, index):
        out = mapper({"file_name": path, "image_id": index})
        assert out is not None, path
        return out

    run.mapper = mapper  # for bench/mapper_breakdown.py
    return run


def measure(fn, files, pairs, offset):
    """(pairs per CPU second, pairs per wall second) over ``pairs`` samples from ``offset``."""
    c0, t0 = time.process_time(), time.perf_counter()
    for k in range(pairs):
        i = (offset + k) % len(files)
        fn(files[i], i)
    return pairs / (time.process_time() - c0), pairs / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["640x480", "1280x960"], help="photo sizes WxH")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per size")
    ap.add_argument("--pairs", type=int, default=40, help="samples per pipeline per round")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of pipeline names to keep")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the last one allowed)")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    import PIL

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, pinned to CPU {cpu}; "
          f"Python {platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}, "
          f"OpenCV {cv2.__version__}, numpy {np.__version__}")
    print(f"# command: {' '.join(sys.argv)}")
    names = [BASELINE] + list(REFERENCES) + list(PIPELINES)
    if args.only:
        names = [BASELINE] + [n for n in list(REFERENCES) + list(PIPELINES) if any(s in n for s in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            files = make_photos(tmp, (w, h))
            fns = {BASELINE: torchvision_two_crop()}
            for n in names[1:]:
                if n in REFERENCES:
                    fns[n] = torchvision_multi_crop() if REFERENCES[n] == "multicrop" else insloc_style_copy_paste(files)
                else:
                    fns[n] = regionssl_mapper(*PIPELINES[n], files)
            for n in names:  # warm-up: caches, lazy imports, file system
                measure(fns[n], files, len(files), 0)
            cpu, wall = {n: [] for n in names}, {n: [] for n in names}
            for r in range(args.rounds):
                random.seed(r)
                np.random.seed(r)
                torch.manual_seed(r)
                for n in names:
                    c, t = measure(fns[n], files, args.pairs, r * args.pairs)
                    cpu[n].append(c)
                    wall[n].append(t)
            for n in names:
                c, t = np.array(cpu[n]), np.array(wall[n])
                ref = next((r for r in REFERENCES if REFERENCES[r] == _reference_kind(n)), None)
                vs_ref = np.median(c / np.array(cpu[ref])) if ref in cpu and ref != n else None
                row = (f"{w}x{h}", n, np.median(c), c.min(), c.max(), np.median(c / np.array(cpu[BASELINE])),
                       vs_ref, np.median(t), np.median(t / np.array(wall[BASELINE])))
                rows.append(row)
                print(f"{w}x{h}  {n:48s} {row[2]:7.1f} pairs/CPU-s ({row[3]:.1f}-{row[4]:.1f}) x{row[5]:.2f}   "
                      f"wall {row[7]:.1f} pairs/s x{row[8]:.2f}", flush=True)
    print()
    print("| photos | pipeline | pairs / CPU-second (median) | min-max over rounds | vs torchvision two-crop | "
          "vs same-style reference | pairs / wall-second (median) | vs torchvision (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size, n, med, lo, hi, ratio, vs_ref, wmed, wratio in rows:
        ref = "" if vs_ref is None else f"{vs_ref:.2f}x"
        print(f"| {size} | {n} | {med:.1f} | {lo:.1f}-{hi:.1f} | {ratio:.2f}x | {ref} | {wmed:.1f} | {wratio:.2f}x |")


def _reference_kind(name):
    """Which reference pipeline a row is built like (None: the two-crop baseline)."""
    if "MultiCrop" in name:
        return "multicrop"
    if "InsLoc" in name:
        return "copypaste"
    return None


if __name__ == "__main__":
    main()

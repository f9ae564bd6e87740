"""Cost per image of the photometric ops: the mapper's (OpenCV/numpy, one view at a time) against the
batched torch ops the model runs with ``INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE`` (here on CPU tensors).

Both apply the same drawn parameters (MoCo-v2's recipe by default: jitter 0.4/0.4/0.4/0.1 p 0.8,
grayscale 0.2, blur p 0.5; ``--recipe`` picks another config) to the same real 224 px views; the
two are timed in interleaved rounds on one thread, medians reported.

    python bench/photometric_device.py --batch 32 --size 224 --rounds 5
"""
import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recipe", default="configs/mocov2.yaml")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from PIL import Image

    from regionssl.data.demo_images import demo_image_files
    from regionssl.data.mapper import RegionSSLDatasetMapper
    from regionssl.data.photometric_batch import apply_photometric, encode_photometric
    from regionssl.engine import get_regionssl_cfg

    cfg = get_regionssl_cfg(os.path.join(REPO, args.recipe), ["INPUT.REGIONSSL.PHOTOMETRIC.ON_DEVICE", "True"])
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=[])
    augs, on_device = mapper.photometric[0].augs, mapper.photometric_on_device
    files = demo_image_files()
    views = [np.ascontiguousarray(Image.open(files[i % len(files)]).convert("RGB").resize((args.size, args.size)))
             for i in range(args.batch)]
    batch = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous().to(args.device)
    host, device = [], []
    for r in range(args.rounds):
        np.random.seed(r)
        drawn = [[a.get_transform(v) for a in augs] for v in views]
        params = torch.stack([encode_photometric(t, **on_device) for t in drawn])
        t0 = time.process_time()
        for v, tfms in zip(views, drawn):
            for t in tfms:
                v = t.apply_image(v)
        host.append((time.process_time() - t0) / args.batch)
        t0 = time.process_time()
        out = apply_photometric(batch, params)
        if args.device != "cpu":
            torch.cuda.synchronize()
        device.append((time.process_time() - t0) / args.batch)
        assert out.shape == batch.shape
    h, d = statistics.median(host) * 1e3, statistics.median(device) * 1e3
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.recipe}, "
          f"batch {args.batch} x {args.size}px, {args.rounds} rounds (median)")
    print("| path | ms per image (CPU time) |\n|---|---:|")
    print(f"| mapper (OpenCV/numpy, per view) | {h:.3f} |\n| batched torch ops on {args.device} | {d:.3f} |")


if __name__ == "__main__":
    main()

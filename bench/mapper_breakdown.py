"""Where one sample's time goes: the stages of a mapper pipeline, timed on one core.

Profile first, then optimise: this wraps the data path's stage functions with timers
(exclusive time: a stage nested in another is not counted twice) and runs one pipeline of
``mapper_throughput.py`` over the same JPEG photos, then its same-style reference with the
reference's decodes timed apart. It prints milliseconds per sample by stage, and what the JPEG
decodes leave of the time budget at 2x the reference:

    python bench/mapper_breakdown.py                                  # InsLoc at 640x480 and 1280x960
    python bench/mapper_breakdown.py --pipeline "MoCo-v2" --sizes 640x480 --samples 400

The wrappers cost about 1 microsecond per call (some 20 calls per InsLoc sample); read shares, and
ratios between pipelines from ``mapper_throughput.py``, which runs them side by side.
"""
import argparse
import functools
import os
import sys
import tempfile
import time
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import torch  # noqa: E402

from regionssl_workbench.scripts import load_script  # noqa: E402

throughput = load_script(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mapper_throughput.py"))

from detectron2.data import transforms as T  # noqa: E402

from regionssl.data import image_io, mapper as mapper_module  # noqa: E402


class StageTimer:
    """Exclusive wall time per stage over wrapped calls (the process is pinned to one idle core).

    A context manager: leaving it puts every wrapped attribute back."""

    def __init__(self):
        self.seconds, self.calls, self._stack, self._wrapped = Counter(), Counter(), [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for owner, attribute, fn, own in reversed(self._wrapped):
            if own:
                setattr(owner, attribute, fn)
            else:  # it was inherited: uncover the base class's again
                delattr(owner, attribute)
        self._wrapped.clear()

    def wrap(self, owner, attribute, stage):
        """Replace ``owner.attribute`` by a timed twin whose time counts toward ``stage``; ``stage`` may be
        a function of the list of enclosing stages' names, outermost first (e.g. to tell the decode of
        a background from the sample's)."""
        fn = getattr(owner, attribute)
        self._wrapped.append((owner, attribute, fn, attribute in vars(owner)))

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = stage([s[0] for s in self._stack]) if callable(stage) else stage
            self._stack.append([name, 0.0])  # [stage, time of nested stages]
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, nested = self._stack.pop()
                self.seconds[name] += elapsed - nested
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][1] += elapsed

        setattr(owner, attribute, timed)


BACKGROUND = "background (read, resize)"


def _decode_stage(enclosing):
    return "JPEG decode, backgrounds" if BACKGROUND in enclosing else "JPEG decode, sample"


def instrument(timer, view_generator, region_sampler):
    """Time the stages of regionssl's data path (class-level wrappers, this process only)."""
    timer.wrap(mapper_module.RegionSSLDatasetMapper, "__call__", "rest (composite, flips, transforms, tensors)")
    timer.wrap(mapper_module, "open_image_or_none", "file read + header")
    timer.wrap(image_io, "open_image_or_none", "file read + header")  # backgrounds' files
    timer.wrap(image_io.ImageFile, "decode", _decode_stage)
    timer.wrap(image_io.BackgroundSource, "resized", BACKGROUND)
    timer.wrap(image_io.DecodedImage, "resized_crop", "resize")
    timer.wrap(T.AugmentationList, "__call__", "photometric (colour, grayscale, blur)")
    timer.wrap(mapper_module, "anchor_jitter", "anchor jitter")
    timer.wrap(type(view_generator), "plan", "view plan (draws)")
    timer.wrap(type(region_sampler), "__call__", "region sampler")


def warm_up(fn, files):
    for i, f in enumerate(files):  # caches, lazy imports, the file system
        fn(f, i)


def run_samples(fn, files, samples):
    """Seconds of CPU time per sample over ``samples`` calls."""
    c0 = time.process_time()
    for k in range(samples):
        fn(files[k % len(files)], k)
    return (time.process_time() - c0) / samples


def breakdown(pipeline, files, samples):
    """(ms per sample of regionssl's pipeline, {stage: (ms per sample, calls per sample)})."""
    config, opts = throughput.PIPELINES[pipeline]
    fn = throughput.regionssl_mapper(config, opts, files)
    with StageTimer() as timer:
        instrument(timer, fn.mapper.view_generator, fn.mapper.region_sampler)
        warm_up(fn, files)
        timer.seconds.clear()
        timer.calls.clear()
        per_sample = run_samples(fn, files, samples)
    stages = {k: (v / samples * 1e3, timer.calls[k] / samples) for k, v in timer.seconds.items()}
    return per_sample * 1e3, stages


def reference_breakdown(kind, files, samples):
    """(ms per sample of the reference, ms of it in JPEG decoding): OpenCV's or PIL's decode timed."""
    fn = throughput.insloc_style_copy_paste(files) if kind == "copypaste" else (
        throughput.torchvision_multi_crop() if kind == "multicrop" else throughput.torchvision_two_crop())
    with StageTimer() as timer:
        timer.wrap(cv2, "imdecode", "decode")
        timer.wrap(throughput, "_pil_loader", "decode")
        warm_up(fn, files)
        timer.seconds.clear()
        per_sample = run_samples(fn, files, samples)
    return per_sample * 1e3, timer.seconds["decode"] / samples * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default="CopyPaste", help="substring of a mapper_throughput.py pipeline name")
    ap.add_argument("--sizes", nargs="+", default=["640x480", "1280x960"], help="photo sizes WxH")
    ap.add_argument("--samples", type=int, default=300, help="samples timed per size")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the last one allowed)")
    args = ap.parse_args()
    names = [n for n in throughput.PIPELINES if args.pipeline in n]
    if not names:
        sys.exit(f"no pipeline matches {args.pipeline!r}; choose from: {', '.join(throughput.PIPELINES)}")
    name = names[0]
    cpu = sorted(os.sched_getaffinity(0))[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    print(f"# {name}, pinned to CPU {cpu}; command: {' '.join(sys.argv)}")
    kind = throughput._reference_kind(name)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            files = throughput.make_photos(tmp, (w, h))
            ref_ms, ref_decode = reference_breakdown(kind, files, args.samples)
            ours_ms, stages = breakdown(name, files, args.samples)
            decode = sum(ms for k, (ms, _) in stages.items() if k.startswith("JPEG decode"))
            print(f"\n## {w}x{h}: {ours_ms:.2f} ms per sample (CPU time), the reference {ref_ms:.2f} ms "
                  f"({ref_ms / ours_ms:.2f}x; its decodes {ref_decode:.2f} ms)\n")
            print("| stage | ms / sample | share | calls / sample |\n|---|---:|---:|---:|")
            for stage, (ms, calls) in sorted(stages.items(), key=lambda kv: -kv[1][0]):
                print(f"| {stage} | {ms:.3f} | {ms / ours_ms:.0%} | {calls:g} |")
            budget = ref_ms / 2
            print(f"\nAt 2x the reference a sample has {budget:.2f} ms; the JPEG decodes take {decode:.2f} ms of ours, "
                  f"leaving {budget - decode:.2f} ms for the rest, which takes {ours_ms - decode:.2f} ms now.")


if __name__ == "__main__":
    main()

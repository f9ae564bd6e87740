"""Config values checked when a run is built: a value out of range stops with one line per key.

A temperature of -0.2 or a crop scale of (1.0, 0.2) trains silently into nonsense; a crop size
of 0 or a MAX_BOXES of 0 dies in a traceback deep inside a loader worker. :func:`check_config`
checks every numeric regionssl key with a range (and the solver keys a run cannot do without)
against :data:`RULES`, and for pretraining whether the crops fit the memory they imply, and raises
:class:`ConfigValueError` listing ``KEY = value: allowed range`` for each violation.
"""
import math
import os

__all__ = ["ConfigValueError", "RULES", "check_config", "crop_memory_bytes", "machine_memory_bytes"]


class ConfigValueError(ValueError):
    """Config values out of their range; one line per key."""


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(lo, hi, lo_open=False, hi_open=False, integer=False):
    def ok(v):
        if not _number(v) or (integer and int(v) != v):
            return False
        above = v > lo if lo_open else v >= lo
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    kind = "an integer" if integer else "a number"
    if hi is None:
        text = f"{kind} {'>' if lo_open else '>='} {lo:g}"
    else:
        text = f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, text


def positive():
    return _interval(0, None, lo_open=True)


def at_least(n, integer=True):
    return _interval(n, None, integer=integer)


def unit(lo_open=False):
    return _interval(0, 1, lo_open=lo_open)


def each(rule, length=None):
    """Every entry of a list satisfies ``rule``; with ``length``, exactly that many entries."""
    ok, text = rule

    def check(v):
        return isinstance(v, (list, tuple)) and (length is None or len(v) == length) and all(ok(x) for x in v)

    return check, (f"{length} values, each " if length else "each value ") + text


def ordered_pair(rule):
    """Two values (lo, hi), lo <= hi, each satisfying ``rule``."""
    ok, text = rule

    def check(v):
        return isinstance(v, (list, tuple)) and len(v) == 2 and ok(v[0]) and ok(v[1]) and v[0] <= v[1]

    return check, f"two values lo <= hi, each {text}"


# key -> (check, allowed range as written in the message)
RULES = {
    "MODEL.REGIONSSL.TEMPERATURE": positive(),
    "MODEL.REGIONSSL.LEVEL_WEIGHTS": each(_interval(0, None)),
    "MODEL.REGIONSSL.BN_SPLITS": at_least(1),
    "MODEL.REGIONSSL.ROI.POOLER_RESOLUTION": at_least(1),
    "MODEL.REGIONSSL.ROI.SAMPLING_RATIO": at_least(0),
    "MODEL.REGIONSSL.MOMENTUM.BASE": unit(),
    "MODEL.REGIONSSL.QUEUE.SIZE": at_least(0),
    "MODEL.REGIONSSL.PROJECTOR.HIDDEN_DIM": at_least(1),
    "MODEL.REGIONSSL.PROJECTOR.OUT_DIM": at_least(1),
    "MODEL.REGIONSSL.PREDICTOR.HIDDEN_DIM": at_least(1),
    "MODEL.REGIONSSL.RESIM.INSTANCE_WEIGHT": _interval(0, None),
    "MODEL.REGIONSSL.RESIM.NEGATIVE_POOL": at_least(1),
    "MODEL.REGIONSSL.SWAV.NUM_PROTOTYPES": at_least(1),
    "MODEL.REGIONSSL.SWAV.EPSILON": positive(),
    "MODEL.REGIONSSL.SWAV.SINKHORN_ITERS": at_least(1),
    "MODEL.REGIONSSL.SWAV.TEMPERATURE": positive(),
    "MODEL.REGIONSSL.SWAV.FREEZE_PROTOTYPES_ITERS": at_least(0),
    "MODEL.REGIONSSL.SWAV.CROPS_FOR_ASSIGN": each(at_least(0)),
    "MODEL.REGIONSSL.SWAV.QUEUE_LENGTH": at_least(0),
    "MODEL.REGIONSSL.SWAV.QUEUE_START_ITER": at_least(0),
    "MODEL.REGIONSSL.CVSA.ALIGN_WEIGHT": _interval(0, None),
    "MODEL.REGIONSSL.CVSA.CONV_DIM": at_least(1),
    "MODEL.REGIONSSL.CVSA.TEMPERATURE": positive(),
    "INPUT.REGIONSSL.CROP_SIZE": at_least(32),
    "INPUT.REGIONSSL.CROP_SCALE": ordered_pair(unit(lo_open=True)),
    "INPUT.REGIONSSL.CROP_RATIO": ordered_pair(positive()),
    "INPUT.REGIONSSL.FLIP_PROB": unit(),
    "INPUT.REGIONSSL.MAX_RESAMPLE": at_least(0),
    "INPUT.REGIONSSL.PHOTOMETRIC.COLOR_JITTER": each(_interval(0, None), length=4),
    "INPUT.REGIONSSL.PHOTOMETRIC.COLOR_JITTER_PROB": unit(),
    "INPUT.REGIONSSL.PHOTOMETRIC.GRAYSCALE_PROB": unit(),
    "INPUT.REGIONSSL.PHOTOMETRIC.BLUR_PROB": each(unit()),
    "INPUT.REGIONSSL.PHOTOMETRIC.BLUR_SIGMA": ordered_pair(positive()),
    "INPUT.REGIONSSL.PHOTOMETRIC.SOLARIZE_PROB": each(unit()),
    "INPUT.REGIONSSL.MULTI_CROP.NUM_CROPS": each(at_least(0)),
    "INPUT.REGIONSSL.MULTI_CROP.SIZES": each(at_least(16)),
    "INPUT.REGIONSSL.MULTI_CROP.MIN_SCALES": each(unit(lo_open=True)),
    "INPUT.REGIONSSL.MULTI_CROP.MAX_SCALES": each(unit(lo_open=True)),
    "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE": ordered_pair(at_least(1)),
    "INPUT.REGIONSSL.JITTER.ANCHOR_STRIDE": at_least(1),
    "INPUT.REGIONSSL.JITTER.ANCHOR_SIZES": each(positive()),
    "INPUT.REGIONSSL.JITTER.ANCHOR_RATIOS": each(positive()),
    "INPUT.REGIONSSL.JITTER.IOU_THRESHOLD": unit(),
    "INPUT.REGIONSSL.JITTER.NMS_THRESHOLD": unit(),
    "INPUT.REGIONSSL.JITTER.FALLBACK_TOPK": at_least(1),
    "INPUT.REGIONSSL.INTERSECTION.MAX_BOXES": at_least(1),
    "INPUT.REGIONSSL.INTERSECTION.MIN_SIZE": at_least(0),
    "INPUT.REGIONSSL.INTERSECTION.IOU_THRESHOLD": unit(),
    "INPUT.REGIONSSL.INTERSECTION.MAX_TRIES": at_least(1),
    "INPUT.REGIONSSL.WINDOWS.SIZES": each(at_least(1)),
    "INPUT.REGIONSSL.WINDOWS.STRIDES": each(at_least(1)),
    "INPUT.REGIONSSL.SALIENCY.WINDOW_FRACTION": unit(lo_open=True),
    "SOLVER.BASE_LR": _interval(0, None),
    "SOLVER.MOMENTUM": unit(),
    "SOLVER.WEIGHT_DECAY": _interval(0, None),
    "SOLVER.MAX_ITER": at_least(1),
    "SOLVER.IMS_PER_BATCH": at_least(1),
    "SOLVER.CHECKPOINT_PERIOD": at_least(1),
    "SOLVER.WARMUP_ITERS": at_least(0),
    "SOLVER.REGIONSSL.LARS_TRUST": positive(),
    "SOLVER.REGIONSSL.ACCUMULATE": at_least(1),
    "TEST.REGIONSSL.PROBE_PERIOD": at_least(0),
    "TEST.REGIONSSL.PROBE_MAX_IMAGES": at_least(1),
    "TEST.REGIONSSL.PROBE_CROP_SIZE": at_least(32),
    "TEST.REGIONSSL.PROBE_ROUNDS": at_least(1),
    "TEST.REGIONSSL.PROBE_GRID": at_least(0),
    "TEST.REGIONSSL.GUARD.PERIOD": at_least(1),
    "TEST.REGIONSSL.GUARD.WINDOW": at_least(1),
    "TEST.REGIONSSL.WEIGHTS_GUARD.MAX_NORM_GROWTH": _interval(0, None),
    "TEST.REGIONSSL.GUARD.MAX_WEIGHT_NORM_GROWTH": _interval(0, None),
    "TEST.REGIONSSL.WEIGHT_NORM_PERIOD": at_least(0),
    "TEST.REGIONSSL.LOADER_WAIT.MAX_FRACTION": unit(),
    "TEST.REGIONSSL.LOADER_WAIT.WINDOW": at_least(1),
}

# Training memory per input pixel of a view (bytes), ResNet-50 trunk and heads in fp32: ~125 MB for
# a 224 x 224 view, an order of magnitude (SCRL's recipe, 256 images x 2 views per 32 GB GPU, comes
# to 60 GiB by it). Only used to stop crops that cannot fit by a wide margin: above twice the device.
_BYTES_PER_PIXEL = 2500


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def machine_memory_bytes(cfg):
    """Memory of the device a process trains on: the GPU's, or this machine's RAM (None if unknown)."""
    import torch

    if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def crop_memory_bytes(cfg, world_size=1):
    """Rough training memory of one process's views per optimizer micro-batch (bytes)."""
    i = cfg.INPUT.REGIONSSL
    images = max(1, cfg.SOLVER.IMS_PER_BATCH // max(1, world_size) // max(1, cfg.SOLVER.REGIONSSL.ACCUMULATE))
    if i.VIEW_GENERATOR == "MultiCrop":
        pixels = sum(n * s * s for n, s in zip(i.MULTI_CROP.NUM_CROPS, i.MULTI_CROP.SIZES))
    else:
        pixels = 2 * i.CROP_SIZE ** 2
    return images * pixels * _BYTES_PER_PIXEL


def check_config(cfg, pretraining=True, world_size=1, memory_bytes=None):
    """Raise :class:`ConfigValueError` (one line per key: value and allowed range) if any value of
    :data:`RULES` is out of range, multi-crop lists disagree, or (``pretraining``) the crops need
    more than twice ``memory_bytes`` (default: :func:`machine_memory_bytes`)."""
    problems = []
    for key, (ok, allowed) in RULES.items():
        try:
            value = _get(cfg, key)
        except KeyError:
            continue
        if not ok(value):
            problems.append(f"{key} = {value!r}: allowed: {allowed}")
    mc = cfg.INPUT.REGIONSSL.MULTI_CROP
    lists = {"NUM_CROPS": mc.NUM_CROPS, "SIZES": mc.SIZES, "MIN_SCALES": mc.MIN_SCALES, "MAX_SCALES": mc.MAX_SCALES}
    if len({len(v) for v in lists.values()}) > 1:
        problems.append("INPUT.REGIONSSL.MULTI_CROP.{NUM_CROPS,SIZES,MIN_SCALES,MAX_SCALES} = "
                        f"{[list(v) for v in lists.values()]}: allowed: one entry per resolution in each")
    elif any(lo > hi for lo, hi in zip(mc.MIN_SCALES, mc.MAX_SCALES)):
        problems.append(f"INPUT.REGIONSSL.MULTI_CROP.MIN_SCALES = {list(mc.MIN_SCALES)}: allowed: each <= its "
                        f"MAX_SCALES entry ({list(mc.MAX_SCALES)})")
    if pretraining and not problems:
        memory = machine_memory_bytes(cfg) if memory_bytes is None else memory_bytes
        need = crop_memory_bytes(cfg, world_size)
        if memory and need > 2 * memory:
            side = int(cfg.INPUT.REGIONSSL.CROP_SIZE * math.sqrt(2 * memory / need)) // 32 * 32
            problems.append(
                f"INPUT.REGIONSSL.CROP_SIZE = {cfg.INPUT.REGIONSSL.CROP_SIZE}: allowed: at most about {max(side, 32)} "
                f"at SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (the views of one process's batch would need about "
                f"{need / 2**30:.0f} GiB to train, this device has {memory / 2**30:.0f} GiB; or raise "
                "SOLVER.REGIONSSL.ACCUMULATE)")
    if problems:
        raise ConfigValueError("Config values out of range:\n  " + "\n  ".join(problems))

"""Pretraining checkpoint -> detector weights, with no conversion step.

A regionssl checkpoint (``model_final.pth``) holds the whole pretraining model; its online
encoder already uses the detector's names. :func:`to_detector_state_dict` keeps only the online
encoder and renames the ResNet trunk between Detectron2's three layouts:

* ResNet backbone:  ``backbone.{stem,res2..res5}.*``
* FPN backbone:     ``backbone.bottom_up.{stem,res2..res5}.*``
* C4 detector:      ``backbone.{stem,res2..res4}.*`` + ``roi_heads.res5.*``

so an FPN-pretrained trunk loads into a C4 detector and vice versa. FPN convolutions
(``backbone.fpn_*``) and a pretrained box head (``roi_heads.box_head.*``) keep their names.
:class:`RegionSSLCheckpointer` applies it when ``MODEL.WEIGHTS`` is a regionssl checkpoint;
``tools/convert_to_detectron2.py`` writes a ``.pkl`` for stock Detectron2.

The checkpointer also makes checkpoints safe to read and hard to lose: every file is read without
running code in it (``regionssl/utils/safe_load.py``), written atomically with a digest of its
contents that is checked when it is read, and ``--resume`` falls back to the previous readable
checkpoint when the last one cannot be read (:meth:`RegionSSLCheckpointer.resume_or_load`).
"""
import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.atomic_file import atomic_write
from .utils.safe_load import CheckpointReadError, load_pickle_file, load_torch_file
from .utils.state_digest import DIGEST_KEY, state_digest

__all__ = [
    "FORMAT_TAG", "FormatTag", "to_detector_state_dict", "to_pretraining_state_dict", "to_trunk_relative",
    "RegionSSLCheckpointer", "NothingToResume", "read_checkpoint", "read_weights_file", "TORCHVISION_INPUT",
    "input_format_of", "input_format_lines",
]

FORMAT_TAG = "regionssl/v1"
_TRUNK = re.compile(r"^(stem|res[2-5])\.")
_ONLINE_PREFIXES = ("backbone.", "roi_heads.")
_TRUNK_LAYOUTS = ("backbone.bottom_up.", "backbone.", "roi_heads.")
_RUN_CHECKPOINT = re.compile(r"^model_(\d{7}|final)\.pth$")  # what Detectron2's PeriodicCheckpointer writes


# The input a ResNet trunk was trained on: every official model imported here and every regionssl
# config (configs/Base-RegionSSL.yaml) uses torchvision's: RGB, ImageNet mean/std x 255, the stride
# in the 3x3 conv. Stock Detectron2 defaults differ (BGR, caffe means, std 1, STRIDE_IN_1X1 True).
TORCHVISION_INPUT = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}


def input_format_of(cfg):
    """The keys of :data:`TORCHVISION_INPUT` as ``cfg`` sets them."""
    return {"INPUT.FORMAT": cfg.INPUT.FORMAT, "MODEL.PIXEL_MEAN": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "MODEL.PIXEL_STD": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "MODEL.RESNETS.STRIDE_IN_1X1": bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1)}


def input_format_lines(fmt):
    """The config lines (``KEY value``, as trailing train_net.py options take them) of an input format."""
    return [f"{k} {'[' + ', '.join(f'{v:g}' for v in fmt[k]) + ']' if isinstance(fmt[k], list) else fmt[k]}"
            for k in TORCHVISION_INPUT if k in fmt]


def input_format_differences(saved, current):
    """'KEY: saved -> current' for each key of an input format that differs (floats to 1e-3)."""
    out = []
    for k in TORCHVISION_INPUT:
        if k not in saved or k not in current:
            continue
        a, b = saved[k], current[k]
        same = (len(a) == len(b) and all(abs(x - y) < 1e-3 for x, y in zip(a, b))) if isinstance(a, list) else a == b
        if not same:
            out.append(f"{k} {a} in the weights, {b} in this config")
    return out


class FormatTag:
    """A checkpointable saved next to the model: marks a checkpoint as a regionssl pretraining one,
    with the input format its trunk was trained on (``input_format``: :func:`input_format_of`)."""

    def __init__(self, meta_architecture, input_format=None):
        self.meta_architecture, self.input_format = meta_architecture, input_format

    def state_dict(self):
        state = {"format": FORMAT_TAG, "meta_architecture": self.meta_architecture}
        if self.input_format:
            state["input_format"] = dict(self.input_format)
        return state

    def load_state_dict(self, state):
        pass


def to_trunk_relative(key):
    """``stem.*``/``resN.*`` name of a ResNet-trunk key in any layout, else None."""
    for prefix in _TRUNK_LAYOUTS:
        if key.startswith(prefix) and _TRUNK.match(key[len(prefix):]):
            return key[len(prefix):]
    return None


def select_encoder(state_dict, encoder="online"):
    """The online encoder's tensors, or the momentum encoder's renamed to online names."""
    if encoder == "momentum":
        state_dict = {k[len("momentum."):]: v for k, v in state_dict.items() if k.startswith("momentum.")}
        if not state_dict:
            raise KeyError("This checkpoint has no momentum encoder (keys 'momentum.*')")
    elif encoder != "online":
        raise ValueError(f"encoder must be 'online' or 'momentum', not {encoder!r}")
    return {k: v for k, v in state_dict.items() if k.startswith(_ONLINE_PREFIXES)}


def to_detector_state_dict(state_dict, target_keys, encoder="online"):
    """Encoder tensors of a pretraining state dict, renamed to the keys of a target detector.

    Args:
        state_dict: the pretraining model's state dict.
        target_keys: keys of the detector's state dict.
    Returns:
        (renamed state dict, number of pretraining tensors not taken).
    """
    target_keys = set(target_keys)
    encoder_sd = select_encoder(state_dict, encoder)
    out = {}
    for key, value in encoder_sd.items():
        rel = to_trunk_relative(key)
        if rel is not None:
            key = next((p + rel for p in _TRUNK_LAYOUTS if p + rel in target_keys), key)
        out[key] = value
    return out, len(state_dict) - len(encoder_sd)


def to_pretraining_state_dict(state_dict, target_keys):
    """A pretraining state dict for another pretraining model (e.g. BYOL -> CVSA stage 2).

    Every tensor keeps its name (online encoder, heads, ``momentum.*`` target), except ResNet-trunk
    keys (also under ``momentum.``) whose name the target lacks: they move to the target's trunk
    layout, as :func:`to_detector_state_dict` does.

    Returns:
        (state dict, number of its keys the target does not have).
    """
    target_keys = set(target_keys)
    out = {}
    for key, value in state_dict.items():
        if key not in target_keys:
            prefix = "momentum." if key.startswith("momentum.") else ""
            rel = to_trunk_relative(key[len(prefix):])
            if rel is not None:
                key = next((prefix + p + rel for p in _TRUNK_LAYOUTS if prefix + p + rel in target_keys), key)
        out[key] = value
    return out, sum(k not in target_keys for k in out)


def read_checkpoint(path):
    """A ``.pth`` checkpoint read safely, its digest checked if it has one (the key removed).

    Raises:
        CheckpointReadError naming the file: unsafe content, empty, truncated, garbled, or
        contents that differ from what was saved.
    """
    data = load_torch_file(path)
    if isinstance(data, dict) and DIGEST_KEY in data:
        expected = data.pop(DIGEST_KEY)
        if state_digest(data) != expected:
            raise CheckpointReadError(path, "its contents differ from what was saved (digest mismatch: the "
                                            "file was damaged on disk or in a copy)")
    return data


def read_weights_file(path):
    """:func:`read_checkpoint` for ``.pth``, the restricted unpickler for ``.pkl``."""
    return load_pickle_file(path) if path.endswith(".pkl") else read_checkpoint(path)


class NothingToResume(RuntimeError):
    """``--resume`` in a folder that holds checkpoints but no ``last_checkpoint`` to resume from."""


def _checkpoint_order(name):
    """Sort key: newest first (model_final, then the highest iteration)."""
    stem = name[len("model_"):-len(".pth")]
    return float("inf") if stem == "final" else int(stem)


class RegionSSLCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that recognises regionssl pretraining checkpoints.

    Loading one into a detector takes the online encoder only (never momentum copies,
    projectors, prototypes or queues), renamed to the detector's layout, and logs the summary.
    Loading one into another *pretraining* model (a two-stage recipe such as BYOL -> CVSA) keeps
    every tensor whose name the model has, heads and momentum target included.

    Files are read safely (``.pth`` with ``weights_only=True``, ``.pkl`` by a restricted unpickler)
    and written atomically (``last_checkpoint`` only after the checkpoint is complete), with a digest
    of the contents under ``regionssl_digest`` that reading checks.

    Weights that say what input they were trained on (imported ones, regionssl pretraining
    checkpoints, our ``.pkl``) loaded under a config that disagrees (``input_format``:
    :func:`input_format_of` the config) give a warning naming both.

    Attributes:
        resumed_from: the checkpoint :meth:`resume_or_load` resumed from ("" if none).
    """

    resumed_from = ""

    def __init__(self, model, save_dir="", *, input_format=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.input_format = input_format

    def _check_input_format(self, checkpoint):
        tag = checkpoint.get("regionssl")
        saved = (tag.get("input_format") if isinstance(tag, dict) else None) or checkpoint.get("regionssl_input_format")
        if not saved or not self.input_format:
            return
        diff = input_format_differences(saved, self.input_format)
        if diff:
            self.logger.warning(
                "These weights were trained on another input than this config gives: " + "; ".join(diff)
                + ". Features computed on the wrong input transfer badly; set " + " ".join(input_format_lines(saved)))

    # ------------------------------------------------------------------ writing
    def save(self, name, **kwargs):
        """fvcore's ``Checkpointer.save`` (same contents and log line), written atomically with a digest."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data[DIGEST_KEY] = state_digest(data)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_write(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    # ------------------------------------------------------------------ reading
    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        except CheckpointReadError:
            self._parsed_url_during_load = None  # DetectionCheckpointer resets it only after a success
            raise

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return self._detectron2_pkl(load_pickle_file(filename), filename)
        return super()._load_file(filename)  # .pth: DetectionCheckpointer -> _torch_load below

    def _torch_load(self, f):
        data = read_checkpoint(f)
        if not isinstance(data, dict):
            raise CheckpointReadError(f, f"expected a dict of weights, found a {type(data).__name__}")
        return data

    def _detectron2_pkl(self, data, filename):
        """The two ``.pkl`` layouts DetectionCheckpointer reads (its own loader unpickles unrestricted)."""
        if not isinstance(data, dict):
            raise CheckpointReadError(filename, f"expected a dict of weights, found a {type(data).__name__}")
        if "model" in data and "__author__" in data:  # Detectron2 model zoo format
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 detection models
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def resume_or_load(self, path, *, resume=True):
        """Detectron2's ``resume_or_load`` that loses nothing.

        With ``resume``: the checkpoint ``last_checkpoint`` names is loaded; if it cannot be read
        (missing, truncated, damaged, unsafe) the error names it and the next newest checkpoint of
        the folder (``model_final.pth``, ``model_NNNNNNN.pth``) is tried, and so on; the one used is
        logged. None readable: CheckpointReadError listing them (nothing is overwritten). A folder
        with checkpoints but no ``last_checkpoint``: :class:`NothingToResume`, instead of starting
        over on top of them. Without ``resume``, or in a folder without checkpoints: ``path`` is
        loaded (model only), as Detectron2 does.
        """
        self.resumed_from = ""
        if not resume:
            return self.load(path, checkpointables=[])
        saved = sorted((n for n in os.listdir(self.save_dir) if _RUN_CHECKPOINT.match(n)) if os.path.isdir(
            self.save_dir) else [], key=_checkpoint_order, reverse=True)
        if not self.has_checkpoint():
            if saved:
                raise NothingToResume(
                    f"--resume: {self.save_dir} holds checkpoints ({', '.join(saved[:3])}"
                    f"{', ...' if len(saved) > 3 else ''}) but no last_checkpoint naming the one to resume from. "
                    f"Nothing was overwritten: write a checkpoint's name into {os.path.join(self.save_dir, 'last_checkpoint')} "
                    "to resume from it, or give another OUTPUT_DIR to start over.")
            return self.load(path, checkpointables=[])
        last = self.get_checkpoint_file()
        candidates = [last] + [os.path.join(self.save_dir, n) for n in saved
                               if os.path.abspath(os.path.join(self.save_dir, n)) != os.path.abspath(last)]
        if not any(os.path.isfile(c) for c in candidates):
            self.logger.warning(f"last_checkpoint names {last}, which does not exist, and {self.save_dir} holds no "
                                f"other checkpoint: starting from MODEL.WEIGHTS ({path or 'random initialisation'}).")
            return self.load(path, checkpointables=[])
        failures = []
        for candidate in candidates:
            if not os.path.isfile(candidate):
                failures.append(f"{candidate}: no such file")
                self.logger.warning(f"Cannot resume from {candidate}: no such file; trying the previous checkpoint.")
                continue
            try:
                ret = self.load(candidate)
            except CheckpointReadError as e:
                failures.append(str(e))
                self.logger.warning(f"{e}; trying the previous checkpoint.")
                continue
            if failures:
                self.logger.warning(f"Resumed from {candidate}, the newest readable checkpoint, instead of {last}.")
            self.resumed_from = candidate
            return ret
        raise CheckpointReadError(self.save_dir, "no checkpoint to resume from can be read:\n  " + "\n  ".join(failures)
                                  + "\nNothing was overwritten. Move them away (or give another OUTPUT_DIR) to start over.")

    def _load_model(self, checkpoint):
        self._check_input_format(checkpoint)
        tag = checkpoint.get("regionssl")
        if isinstance(tag, dict) and tag.get("format") == FORMAT_TAG and not self._is_same_architecture(checkpoint):
            target = self.model.state_dict().keys()
            if self._is_pretraining_model():
                checkpoint["model"], unused = to_pretraining_state_dict(checkpoint["model"], target)
                logging.getLogger(__name__).info(
                    f"Pretraining checkpoint of {tag.get('meta_architecture')} into pretraining model "
                    f"{type(self._bare_model()).__name__}: {len(checkpoint['model']) - unused} tensors by name "
                    f"(encoder, heads, momentum target), {unused} not in this model."
                )
                return super()._load_model(checkpoint)
            checkpoint["model"], dropped = to_detector_state_dict(checkpoint["model"], target)
            loaded = sorted(k for k in checkpoint["model"] if k in target)
            groups = sorted({".".join(k.split(".")[:2]) for k in loaded})
            logging.getLogger(__name__).info(
                f"Pretraining checkpoint of {tag.get('meta_architecture')}: loading {len(loaded)} online-encoder "
                f"tensors into the detector ({', '.join(groups)}); {dropped} tensors of momentum encoder, "
                f"heads and queues are not loaded."
            )
        return super()._load_model(checkpoint)

    def _bare_model(self):
        return getattr(self.model, "module", self.model)

    def _is_same_architecture(self, checkpoint):
        """Resuming a pretraining run loads everything as is."""
        return type(self._bare_model()).__name__ == checkpoint["regionssl"].get("meta_architecture")

    def _is_pretraining_model(self):
        from .modeling.meta_arch.base import RegionSSLBase  # lazy: modeling imports are heavy

        return isinstance(self._bare_model(), RegionSSLBase)

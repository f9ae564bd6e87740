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
"""
import logging
import re

from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "FORMAT_TAG", "FormatTag", "to_detector_state_dict", "to_pretraining_state_dict", "to_trunk_relative",
    "RegionSSLCheckpointer",
]

FORMAT_TAG = "regionssl/v1"
_TRUNK = re.compile(r"^(stem|res[2-5])\.")
_ONLINE_PREFIXES = ("backbone.", "roi_heads.")
_TRUNK_LAYOUTS = ("backbone.bottom_up.", "backbone.", "roi_heads.")


class FormatTag:
    """A checkpointable saved next to the model: marks a checkpoint as a regionssl pretraining one."""

    def __init__(self, meta_architecture):
        self.meta_architecture = meta_architecture

    def state_dict(self):
        return {"format": FORMAT_TAG, "meta_architecture": self.meta_architecture}

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


class RegionSSLCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that recognises regionssl pretraining checkpoints.

    Loading one into a detector takes the online encoder only (never momentum copies,
    projectors, prototypes or queues), renamed to the detector's layout, and logs the summary.
    Loading one into another *pretraining* model (a two-stage recipe such as BYOL -> CVSA) keeps
    every tensor whose name the model has, heads and momentum target included.
    """

    def _load_model(self, checkpoint):
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

"""Official checkpoints -> regionssl checkpoints that fine-tune like our own.

Each official code saves its encoder under its own names. A :class:`Layout` places every key of
such a state dict: either renamed to the name our pretraining models give the online encoder
(ResNet trunk ``backbone[.bottom_up].{stem,res2..res5}``, C4 ``roi_heads.res5``, FPN
``backbone.fpn_*``, box head ``roi_heads.box_head.*``), or knowingly left out (momentum
encoder, queues, projection heads, prototypes). A key no rule places stops the import with a
message listing it: nothing is dropped silently.

The result is written as a regionssl checkpoint (tagged :data:`~regionssl.checkpoint.FORMAT_TAG`),
so :class:`~regionssl.checkpoint.RegionSSLCheckpointer` loads it into any detector exactly as a
``model_final.pth`` of ours (the trunk renamed to the detector's layout), and
``tools/convert_to_detectron2.py`` turns it into a ``.pkl`` for stock Detectron2.

Layouts (key names read in each official repository's model / converter code):

=============  ==================================  ==============================================
layout         official code                        what transfers
=============  ==================================  ==============================================
mocov2         facebookresearch/moco                ``module.encoder_q.*`` torchvision ResNet
resim          Tete-Xiao/ReSim (MoCo fork)          as mocov2 + ``fpn_lateral3-5``, ``fpn_output3-4``
insloc         limbo0000/InstanceLoc (mmdet)        ResNet + FPN P2-P5 (BN) + box head conv1-4, fc1
insloc_c4      limbo0000/InstanceLoc ``--c4``       ResNet res2-4 + ``roi_head.shared_head`` (res5)
scrl           kakaobrain/scrl                      ``online_network_state_dict`` ``encoder.<i>``
swav           facebookresearch/swav                ``module.*`` torchvision ResNet
byol           torchvision-layout BYOL conversions  plain torchvision ResNet keys
=============  ==================================  ==============================================
"""
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import torch

from .checkpoint import FORMAT_TAG, TORCHVISION_INPUT, to_trunk_relative
from .utils.atomic_file import atomic_write
from .utils.safe_load import load_pickle_file, load_torch_file

__all__ = ["LAYOUTS", "Layout", "torchvision_to_trunk", "convert_state_dict", "import_checkpoint", "UnplacedKeysError",
           "TrunkMismatchError", "target_trunk_shapes", "trunk_mismatches"]

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)$")
_STAGES = ("stem", "res2", "res3", "res4", "res5")


def torchvision_to_trunk(key):
    """Detectron2 trunk-relative name (``stem.*`` / ``resN.*``) of a torchvision ResNet key, else None.

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerN.b`` -> ``res{N+1}.b``;
    ``bnK`` -> ``convK.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``.
    """
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1.") and key.count(".") == 1:
        return "stem.conv1.norm." + key[4:]
    m = _BLOCK.match(key)
    if m is None:
        return None
    stage, block, layer, param = m.groups()
    head = f"res{int(stage) + 1}.{block}"
    if layer.startswith("conv"):
        return f"{head}.{layer}.{param}"
    if layer.startswith("bn"):
        return f"{head}.conv{layer[2]}.norm.{param}"
    return f"{head}.shortcut.{param}" if layer == "downsample.0" else f"{head}.shortcut.norm.{param}"


def _trunk_rule(prefix, layout, index_names=None):
    """Rule placing ``prefix + <torchvision key>`` into our trunk layout ("resnet", "fpn" or "c4").

    ``index_names`` maps the first component (e.g. SCRL's nn.Sequential indices) to torchvision names.
    """

    def place(key):
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        if index_names is not None:
            first, _, tail = rest.partition(".")
            if first not in index_names:
                return None
            rest = f"{index_names[first]}.{tail}"
        rel = torchvision_to_trunk(rest)
        if rel is None:
            return None
        if layout == "fpn":
            return "backbone.bottom_up." + rel
        if layout == "c4" and rel.startswith("res5."):
            return "roi_heads." + rel
        return "backbone." + rel

    return place


def _regex_rule(pattern, target):
    """Rule renaming keys matching ``pattern``; ``target(match) -> name``."""
    compiled = re.compile(pattern)

    def place(key):
        m = compiled.match(key)
        return None if m is None else target(m)

    return place


@dataclass
class Layout:
    """How one official code names its encoder.

    Attributes:
        name: layout name (``--layout``).
        source: official repository the names come from.
        containers: top-level checkpoint keys that may hold the state dict, tried in order
            (a checkpoint whose values are all tensors is the state dict itself).
        rules: functions key -> our name or None; the first that places a key wins.
        drop: (regex, what) of keys that are knowingly not transferred.
    """

    name: str
    source: str
    containers: tuple
    rules: list
    drop: list = field(default_factory=list)

    def place(self, key):
        """(our name, None) if transferred, (None, what) if knowingly dropped, (None, None) if unknown."""
        for rule in self.rules:
            target = rule(key)
            if target is not None:
                return target, None
        for pattern, what in self.drop:
            if re.match(pattern, key):
                return None, what
        return None, None


_MOCO_DROP = [
    (r"^module\.encoder_q\.fc\.", "projection MLP"),
    (r"^module\.encoder_k\.", "momentum encoder"),
    (r"^module\.queue(_ptr)?$", "queue"),
]


def _fpn_rule(prefix, sub_conv, sub_norm, kinds, offset):
    """FPN convs ``prefix<kind>s.<i>.<sub>.<param>`` -> ``backbone.fpn_<ours><i + offset>[.norm].<param>``."""
    names = "|".join(kinds)
    pattern = rf"^{re.escape(prefix)}({names})\.?(\d)\.({sub_conv}|{sub_norm})\.(\w+)$"

    def target(m):
        kind, idx, sub, param = m.groups()
        norm = ".norm" if sub == sub_norm else ""
        return f"backbone.fpn_{kinds[kind]}{int(idx) + offset}{norm}.{param}"

    return _regex_rule(pattern, target)


LAYOUTS = {
    layout.name: layout
    for layout in [
        Layout(
            "mocov2", "facebookresearch/moco", ("state_dict",),
            [_trunk_rule("module.encoder_q.", "resnet")], _MOCO_DROP,
        ),
        Layout(
            "resim", "Tete-Xiao/ReSim", ("state_dict",),
            [
                _trunk_rule("module.encoder_q.", "fpn"),
                # FPN convs with bias (default) or, with --fpn-bn, nn.Sequential(conv, norm)
                _regex_rule(r"^module\.encoder_q\.fpn_(lateral[345]|output[34])\.(weight|bias)$",
                            lambda m: f"backbone.fpn_{m[1]}.{m[2]}"),
                _fpn_rule("module.encoder_q.fpn_", "0", "1", {"lateral": "lateral", "output": "output"}, 0),
            ],
            _MOCO_DROP,
        ),
        Layout(
            "insloc", "limbo0000/InstanceLoc", ("state_dict",),
            [
                _trunk_rule("backbone.", "fpn"),
                # mmcv ConvModule: ``.conv`` and ``.bn``; level i of the neck is P(i+2)
                _fpn_rule("neck.", "conv", "bn", {"lateral_convs": "lateral", "fpn_convs": "output"}, 2),
                _regex_rule(r"^roi_head\.bbox_head\.shared_convs\.(\d+)\.(conv|bn)\.(\w+)$",
                            lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}{'.norm' if m[2] == 'bn' else ''}.{m[3]}"),
                _regex_rule(r"^roi_head\.bbox_head\.shared_fcs\.0\.(\w+)$", lambda m: f"roi_heads.box_head.fc1.{m[1]}"),
            ],
            [
                (r"^(backbone|neck|roi_head|rpn_head)_k\.", "momentum encoder"),
                (r"^queues?$|^queue_ptr$", "queues"),
                (r"^roi_head\.bbox_head\.(shared_fcs\.[1-9]\d*|fc_cls)\.", "projection layers after fc1"),
                (r"^rpn_head\.", "box-augmentation head"),
            ],
        ),
        Layout(
            "insloc_c4", "limbo0000/InstanceLoc (--c4)", ("state_dict",),
            [
                _trunk_rule("backbone.", "c4"),
                _trunk_rule("roi_head.shared_head.", "c4"),  # res5 as the RoI head, as Detectron2's C4
            ],
            [
                (r"^(backbone|roi_head|rpn_head)_k\.", "momentum encoder"),
                (r"^queues?$|^queue_ptr$", "queues"),
                (r"^roi_head\.bbox_head\.", "projection head after res5"),
                (r"^rpn_head\.", "box-augmentation head"),
            ],
        ),
        Layout(
            "scrl", "kakaobrain/scrl", ("online_network_state_dict",),
            [
                _trunk_rule("encoder.", "resnet",
                            {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}),
                _trunk_rule("module.encoder.", "resnet",
                            {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}),
            ],
            [(r"^(module\.)?projector\.", "projector")],
        ),
        Layout(
            "swav", "facebookresearch/swav", ("state_dict",),
            [_trunk_rule("module.", "resnet")],
            [(r"^module\.projection_head\.", "projection head"), (r"^module\.prototypes\.", "prototypes")],
        ),
        Layout(
            "byol", "torchvision ResNet-50 state dict (BYOL conversions)", ("state_dict", "model"),
            [_trunk_rule("", "resnet")],
            [(r"^fc\.", "classifier")],
        ),
    ]
}


class UnplacedKeysError(ValueError):
    """A checkpoint has keys no rule of the layout places."""


class TrunkMismatchError(ValueError):
    """The imported ResNet does not have the shapes of the detector's (a wider or deeper ResNet)."""


def target_trunk_shapes(cfg=None):
    """{``stem.*``/``resN.*`` name: shape} of the ResNet ``cfg`` builds (default: regionssl's
    ResNet-50, configs/Base-RegionSSL.yaml's MODEL.RESNETS)."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    if cfg is None:
        from .engine.setup import get_regionssl_cfg

        cfg = get_regionssl_cfg(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                             "Base-RegionSSL.yaml"))
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    trunk = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def trunk_mismatches(converted, target_shapes):
    """Trunk keys of ``converted`` whose shape differs from the target's, that the target lacks, and
    target keys ``converted`` lacks: (list of 'key: shape vs shape', extra keys, missing keys)."""
    trunk = {to_trunk_relative(k): v for k, v in converted.items() if to_trunk_relative(k) is not None}
    wrong = [f"{k} {tuple(v.shape)} vs {target_shapes[k]}" for k, v in trunk.items()
             if k in target_shapes and tuple(v.shape) != target_shapes[k]]
    extra = [k for k in trunk if k not in target_shapes]
    missing = [k for k in target_shapes if k not in trunk and not k.endswith("num_batches_tracked")]
    return wrong, extra, missing


def _state_dict_of(ckpt, layout, src):
    """The state dict inside an official checkpoint ({name: tensor})."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in layout.containers:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not ckpt or not all(torch.is_tensor(v) or hasattr(v, "__array__") for v in ckpt.values()):
        raise ValueError(
            f"{src}: no state dict found for layout {layout.name!r} (looked for top-level keys "
            f"{list(layout.containers)} or a dict of tensors); top-level keys: {sorted(ckpt)[:20]}"
        )
    return {k: v if torch.is_tensor(v) else torch.as_tensor(v) for k, v in ckpt.items()}


def convert_state_dict(state_dict, layout):
    """Place every key of an official state dict.

    Returns:
        (converted {our name: tensor}, Counter of dropped keys per reason, list of unplaced keys)
    """
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    out, dropped, unplaced = {}, Counter(), []
    for key, value in state_dict.items():
        target, what = layout.place(key)
        if target is not None:
            if target in out:
                raise ValueError(f"Layout {layout.name!r} maps two keys to {target!r} (second: {key!r})")
            out[target] = value
        elif what is not None:
            dropped[what] += 1
        else:
            unplaced.append(key)
    return out, dropped, unplaced


def _missing_stages(converted):
    stages = {re.sub(r"^(backbone\.bottom_up\.|backbone\.|roi_heads\.)", "", k).split(".")[0] for k in converted}
    return [s for s in _STAGES if s not in stages]


def _format_keys(keys, limit=30):
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def detect_layout(ckpt, src="checkpoint"):
    """Name of the first layout that places every key and finds a whole ResNet trunk."""
    best = None
    for name, layout in LAYOUTS.items():
        try:
            sd = _state_dict_of(ckpt, layout, src)
        except ValueError:
            continue
        converted, _, unplaced = convert_state_dict(sd, layout)
        if not unplaced and not _missing_stages(converted):
            return name
        if converted and (best is None or len(unplaced) < len(best[1])):
            best = (name, unplaced, _missing_stages(converted))
    if best is None:
        raise UnplacedKeysError(f"{src}: no known layout ({', '.join(LAYOUTS)}) recognises any key of this checkpoint")
    if not best[1]:
        raise UnplacedKeysError(f"{src}: layout {best[0]!r} places every key but finds no ResNet "
                                f"{', '.join(best[2])} keys (incomplete trunk)")
    raise UnplacedKeysError(
        f"{src}: no known layout places every key; the closest, {best[0]!r}, could not place "
        f"{len(best[1])} keys: {_format_keys(best[1])}"
    )


def _refuse_detectron2_pkl(src):
    """A Detectron2 ``.pkl`` needs no import; say so instead of torch's 'Invalid magic number'."""
    if zipfile.is_zipfile(src):
        return
    try:
        data = load_pickle_file(src)
    except Exception:  # noqa: BLE001 - not a plain pickle: torch's legacy format, read below
        return
    if isinstance(data, dict) and ("__author__" in data or "matching_heuristics" in data or "blobs" in data):
        raise ValueError(f"{src} is a Detectron2 .pkl (weights already in Detectron2's names): it needs no import; "
                         "give it as MODEL.WEIGHTS directly. The importer reads official pretraining checkpoints.")


def import_checkpoint(src, dst, layout="auto", target_cfg=None):
    """Convert the official checkpoint ``src`` to a regionssl checkpoint ``dst`` (.pth).

    The ResNet is checked against the detector's (``target_cfg``'s MODEL.RESNETS, default ResNet-50)
    before anything is written; the checkpoint records the input format the official models were
    trained on (:data:`~regionssl.checkpoint.TORCHVISION_INPUT`).

    Returns:
        dict with ``layout``, ``converted`` ({our name: tensor}), ``dropped`` (Counter) and
        ``input_format``.
    Raises:
        UnplacedKeysError listing every key the layout could not place; TrunkMismatchError if the
        trunk's shapes are not the target's; CheckpointReadError for an unsafe, empty or truncated
        file; ValueError for a Detectron2 .pkl.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Checkpoint {src!r} does not exist")
    _refuse_detectron2_pkl(src)
    ckpt = load_torch_file(src)  # CheckpointReadError naming src if it holds more than weights
    name = detect_layout(ckpt, src) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise ValueError(f"Unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    converted, dropped, unplaced = convert_state_dict(_state_dict_of(ckpt, LAYOUTS[name], src), name)
    if unplaced:
        raise UnplacedKeysError(
            f"{src}: layout {name!r} could not place {len(unplaced)} keys: {_format_keys(unplaced)}"
        )
    missing = _missing_stages(converted)
    if missing:
        raise UnplacedKeysError(f"{src}: layout {name!r} found no ResNet {', '.join(missing)} keys (incomplete trunk)")
    wrong, extra, absent = trunk_mismatches(converted, target_trunk_shapes(target_cfg))
    if wrong or extra or absent:
        r = (target_cfg.MODEL.RESNETS if target_cfg is not None else None)
        target = (f"ResNet-{r.DEPTH} (WIDTH_PER_GROUP {r.WIDTH_PER_GROUP}, NUM_GROUPS {r.NUM_GROUPS})" if r is not None
                  else "ResNet-50 of configs/Base-RegionSSL.yaml")
        parts = [f"{len(wrong)} with other shapes ({_format_keys(wrong, 3)})" if wrong else "",
                 f"{len(extra)} the target lacks ({_format_keys(extra, 3)})" if extra else "",
                 f"{len(absent)} of the target missing ({_format_keys(absent, 3)})" if absent else ""]
        raise TrunkMismatchError(
            f"{src}: layout {name!r} gives a ResNet that does not fit the target {target}: "
            + "; ".join(p for p in parts if p) + ". A wider or deeper ResNet would load only in part; give the "
            "detector config it is for (--config-file) with matching MODEL.RESNETS keys.")
    fmt = dict(TORCHVISION_INPUT)
    tag = {"format": FORMAT_TAG, "meta_architecture": f"imported:{name}", "source": os.path.basename(src),
           "input_format": fmt}
    with atomic_write(dst, "wb") as f:
        torch.save({"model": converted, "regionssl": tag}, f)
    return {"layout": name, "converted": converted, "dropped": dropped, "input_format": fmt}

#!/usr/bin/env python
"""Write a regionssl pretraining checkpoint as a Detectron2 ``.pkl`` for stock Detectron2.

Only needed outside regionssl: our own ``train_net.py`` takes ``model_final.pth`` directly as
``MODEL.WEIGHTS``. The ``.pkl`` holds exactly the encoder's detector keys: the ResNet trunk as
``stem.*``/``res2..res5.*`` (Detectron2's name matching puts them under ``backbone.bottom_up``
for FPN and ``roi_heads.res5`` for C4), plus ``backbone.fpn_*`` and ``roi_heads.box_head.*``
when the method pretrains them. Saved as numpy arrays with ``matching_heuristics: True``
(docs/finetune_protocols.md). The input is read with ``weights_only=True``.

    python tools/convert_to_detectron2.py output/insloc_fpn/model_final.pth insloc_fpn.pkl
"""
import argparse
import os
import pickle
import sys

from regionssl.checkpoint import (
    FORMAT_TAG, TORCHVISION_INPUT, input_format_lines, read_checkpoint, select_encoder, to_trunk_relative,
)
from regionssl.utils.atomic_file import atomic_write
from regionssl.utils.safe_load import CheckpointReadError


def convert(src, dst, encoder="online"):
    """Convert ``src`` (.pth) to ``dst`` (.pkl); returns the written {key: ndarray} dict."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Checkpoint {src!r} does not exist")
    ckpt = read_checkpoint(src)  # CheckpointReadError naming src if unsafe or unreadable
    tag = ckpt.get("regionssl", {}) if isinstance(ckpt, dict) else {}
    if tag.get("format") != FORMAT_TAG:
        raise ValueError(f"{src!r} is not a regionssl pretraining checkpoint (no '{FORMAT_TAG}' tag)")
    state = select_encoder(ckpt["model"], encoder)
    out = {}
    for key, value in state.items():
        rel = to_trunk_relative(key)
        out[rel if rel is not None else key] = value.detach().cpu().numpy()
    # the input the trunk was trained on (checkpoints without it come from configs/Base-RegionSSL.yaml's)
    fmt = tag.get("input_format") or dict(TORCHVISION_INPUT)
    with atomic_write(dst, "wb") as f:
        pickle.dump({"model": out, "__author__": "regionssl", "matching_heuristics": True,
                     "regionssl_input_format": fmt}, f)
    return out, dict(tag, input_format=fmt)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="regionssl checkpoint (.pth)")
    parser.add_argument("output", help="output .pkl")
    parser.add_argument("--encoder", choices=["online", "momentum"], default="online",
                        help="which encoder to export (default: the online/query encoder, as MoCo and BYOL transfer)")
    args = parser.parse_args(argv)
    try:
        out, tag = convert(args.input, args.output, args.encoder)
    except (CheckpointReadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"convert_to_detectron2: {e}")
    groups = {}
    for k in out:
        g = "trunk" if k.startswith(("stem.", "res")) else ".".join(k.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    print(f"{tag.get('meta_architecture')} checkpoint, {args.encoder} encoder -> {args.output}: "
          + ", ".join(f"{g}: {n} tensors" for g, n in sorted(groups.items())))
    print("Stock Detectron2 defaults to another input (BGR, caffe means, std 1, STRIDE_IN_1X1 True); these weights "
          "need: " + " ".join(input_format_lines(tag["input_format"])))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Write a regionssl pretraining checkpoint as a Detectron2 ``.pkl`` for stock Detectron2.

Only needed outside regionssl: our own ``train_net.py`` takes ``model_final.pth`` directly as
``MODEL.WEIGHTS``. The ``.pkl`` holds exactly the encoder's detector keys: the ResNet trunk as
``stem.*``/``res2..res5.*`` (Detectron2's name matching puts them under ``backbone.bottom_up``
for FPN and ``roi_heads.res5`` for C4), plus ``backbone.fpn_*`` and ``roi_heads.box_head.*``
when the method pretrains them. Saved as numpy arrays with ``matching_heuristics: True``
(docs/finetune_protocols.md: the safe route with torch.load's weights_only default).

    python tools/convert_to_detectron2.py output/insloc_fpn/model_final.pth insloc_fpn.pkl
"""
import argparse
import os
import pickle

import torch

from regionssl.checkpoint import FORMAT_TAG, select_encoder, to_trunk_relative


def convert(src, dst, encoder="online"):
    """Convert ``src`` (.pth) to ``dst`` (.pkl); returns the written {key: ndarray} dict."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"Checkpoint {src!r} does not exist")
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    tag = ckpt.get("regionssl", {}) if isinstance(ckpt, dict) else {}
    if tag.get("format") != FORMAT_TAG:
        raise ValueError(f"{src!r} is not a regionssl pretraining checkpoint (no '{FORMAT_TAG}' tag)")
    state = select_encoder(ckpt["model"], encoder)
    out = {}
    for key, value in state.items():
        rel = to_trunk_relative(key)
        out[rel if rel is not None else key] = value.detach().cpu().numpy()
    with open(dst, "wb") as f:
        pickle.dump({"model": out, "__author__": "regionssl", "matching_heuristics": True}, f)
    return out, tag


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="regionssl checkpoint (.pth)")
    parser.add_argument("output", help="output .pkl")
    parser.add_argument("--encoder", choices=["online", "momentum"], default="online",
                        help="which encoder to export (default: the online/query encoder, as MoCo and BYOL transfer)")
    args = parser.parse_args(argv)
    out, tag = convert(args.input, args.output, args.encoder)
    groups = {}
    for k in out:
        g = "trunk" if k.startswith(("stem.", "res")) else ".".join(k.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    print(f"{tag.get('meta_architecture')} checkpoint, {args.encoder} encoder -> {args.output}: "
          + ", ".join(f"{g}: {n} tensors" for g, n in sorted(groups.items())))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
r"""Import an official pretrained checkpoint so our fine-tuning protocols can use it.

    python tools/import_checkpoint.py moco_v2_800ep_pretrain.pth.tar imported/mocov2_800ep.pth
    python tools/import_checkpoint.py insloc_fpn_200ep.pth imported/insloc_fpn.pth --layout insloc \
        --pkl imported/insloc_fpn.pkl     # also a .pkl for stock Detectron2

The written ``.pth`` is a regionssl checkpoint: give it as ``MODEL.WEIGHTS`` to any fine-tuning
config (the ResNet trunk is renamed to the detector's C4 or FPN layout when loaded; FPN and box
head land where the official converters put them). Layouts: ``mocov2``, ``resim``, ``insloc``,
``insloc_c4``, ``scrl``, ``swav``, ``byol`` (torchvision ResNet keys), or ``auto`` (default: the
first layout that places every key). A key no rule places stops the import and is listed.
"""
import argparse
import os

from regionssl.checkpoint_import import LAYOUTS, import_checkpoint


def _groups(keys):
    counts = {}
    for k in keys:
        parts = k.split(".")
        group = "trunk" if any(p in ("stem", "res2", "res3", "res4", "res5") for p in parts[:3]) else ".".join(parts[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{g}: {n}" for g, n in sorted(counts.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.pth / .pth.tar)")
    parser.add_argument("output", help="regionssl checkpoint to write (.pth), a valid MODEL.WEIGHTS")
    parser.add_argument("--layout", default="auto", choices=["auto"] + list(LAYOUTS))
    parser.add_argument("--pkl", default="", help="also write a Detectron2 .pkl (tools/convert_to_detectron2.py)")
    args = parser.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = import_checkpoint(args.input, args.output, args.layout)
    layout = LAYOUTS[result["layout"]]
    dropped = ", ".join(f"{what}: {n}" for what, n in sorted(result["dropped"].items())) or "none"
    print(f"{args.input}: layout {layout.name} ({layout.source})\n"
          f"  imported {len(result['converted'])} tensors ({_groups(result['converted'])})\n"
          f"  not transferred: {dropped}\n  -> {args.output}")
    if args.pkl:
        from regionssl_workbench.scripts import load_script

        convert = load_script(os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_to_detectron2.py")).convert
        written, _ = convert(args.output, args.pkl)
        print(f"  -> {args.pkl} ({len(written)} tensors, Detectron2 name matching)")
    return result


if __name__ == "__main__":
    main()

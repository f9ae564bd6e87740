#!/usr/bin/env python
"""Give every convolution that feeds a BatchNorm the weight norm of Detectron2's initialisation.

    python tools/rescale_conv_norms.py output/learning/mocov2/model_final.pth mocov2_rescaled.pth

A BatchNorm divides out the scale of the convolution before it: multiplying that convolution's
weight by s, and the BatchNorm's running mean by s and running variance by s^2, leaves the network's
output unchanged in training and in eval mode (up to the BatchNorm's eps). Its *learning rate* does not stay unchanged: the loss
does not depend on |w|, so its gradient is orthogonal to w and shrinks as 1/|w|, and SGD turns w by
about lr |g| / |w| ~ lr / |w|^2 per step. A weight that grew 30x during a pretraining is, when
fine-tuned at the lr of a random init, in effect frozen. Short CPU pretrainings do exactly that to
the stem (docs/transfer.md: 15-100x for the stem, 1.4-6x for res2, res3-res5 unchanged).
This tool sets every such weight to the norm c2_msra_fill gives it (std sqrt(2 / fan_out), the
detector's random init), so that a fine-tune compares what the pretraining learned, not a weight
scale. A diagnostic for tiny pretrainings; the papers' protocols load weights as they are.

The output is the same kind of checkpoint as the input (a regionssl pretraining checkpoint stays
one, so ``MODEL.WEIGHTS`` and ``tools/transfer.py`` take it directly).
"""
import argparse
import math
import os
import sys

import torch


def rescale_conv_norms(state_dict):
    """Rescale, in place, every 4-D ``*.weight`` whose ``*.norm.running_var`` exists.

    Args:
        state_dict: name -> tensor (a model's ``state_dict``).
    Returns:
        {weight name: factor s applied} (``s = sqrt(2 / fan_out) / std(w)``).
    """
    factors = {}
    for name, w in state_dict.items():
        base = name[: -len("weight")]
        if not name.endswith(".weight") or w.dim() != 4 or base + "norm.running_var" not in state_dict:
            continue
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        s = math.sqrt(2.0 / fan_out) / float(w.float().std())
        state_dict[name] = w * s
        state_dict[base + "norm.running_mean"] = state_dict[base + "norm.running_mean"] * s
        state_dict[base + "norm.running_var"] = state_dict[base + "norm.running_var"] * s * s
        factors[name] = s
    return factors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a checkpoint (regionssl pretraining or Detectron2 .pth)")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        sys.exit(f"rescale_conv_norms: {args.input} does not exist")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        sys.exit("rescale_conv_norms: the output must be a new file (the input is kept)")
    ckpt = torch.load(args.input, map_location="cpu", weights_only=False)
    state_dict = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    factors = rescale_conv_norms(state_dict)
    if not factors:
        sys.exit(f"rescale_conv_norms: {args.input} has no convolution followed by a BatchNorm")
    torch.save(ckpt, args.output)
    shrunk = sorted(factors.items(), key=lambda kv: kv[1])[:5]
    print(f"{len(factors)} convolutions rescaled; strongest (weight divided by): "
          + ", ".join(f"{k} {1 / s:.1f}x" for k, s in shrunk))
    return factors


if __name__ == "__main__":
    main()

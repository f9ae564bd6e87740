#!/usr/bin/env python
"""Retrieval probe of a pretraining checkpoint, next to the same architecture at random init.

    python tools/probe.py --config-file configs/quick_schedules/insloc_c4_probe_demo.yaml \
        --weights output/insloc_c4_probe_demo/model_final.pth --random-init

prints one column per model (checkpoint; random initialisation = the same config built fresh
with the same seed) and one row per probe number (see ``regionssl/probe.py``). Trailing
``KEY VALUE`` pairs override the config, e.g. ``TEST.REGIONSSL.PROBE_CROP_SIZE 128``.
"""
import argparse
import json
import os
import time

import torch

import regionssl  # noqa: F401  (registers models and datasets)
from detectron2.modeling import build_model
from regionssl.checkpoint import RegionSSLCheckpointer
from regionssl.engine import adapt_to_machine, get_regionssl_cfg
from regionssl.probe import run_probe

ROWS = ("top1", "top1_v1_to_v2", "top1_v2_to_v1", "image_top1", "num_regions", "num_queries", "chance")


def build(cfg, seed, weights=None):
    torch.manual_seed(seed)  # same seed -> same random initialisation for every column
    model = build_model(cfg)
    if weights:
        RegionSSLCheckpointer(model).load(weights)
    return model


def print_table(columns, rows):
    """Markdown table: one column per model, one row per probe number."""
    print("| metric | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for metrics in columns.values():
            v = metrics[row]
            cells.append(v if isinstance(v, str) else f"{int(v)}" if row.startswith("num_") else f"{v:.3f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


def split_seeds(tokens, opts, parser):
    """``--seeds`` is greedy: ``--seeds 0 1 2 MODEL.X y`` gives tokens [0, 1, 2, MODEL.X, y].
    Returns (leading integer seeds, the remaining tokens + opts) as Detectron2's trailing opts."""
    n = 0
    while n < len(tokens) and tokens[n].lstrip("-").isdigit():
        n += 1
    if n == 0:
        parser.error(f"--seeds needs at least one integer, got {tokens[0]!r}")
    return [int(t) for t in tokens[:n]], list(tokens[n:]) + list(opts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="pretraining checkpoint (default: MODEL.WEIGHTS)")
    parser.add_argument("--random-init", action="store_true", help="add a random-initialisation column")
    parser.add_argument("--dataset", default=None, help="probe dataset (default TEST.REGIONSSL.PROBE_DATASET)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--seeds", nargs="+", default=["0"],
                        help="probe seeds (views, boxes, augmentation); several give a table of means. "
                             "Config overrides may follow them (--seeds 0 1 2 MODEL.X y)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the model construction")
    parser.add_argument("--output-json", default=None,
                        help="also write {column: {seed: metrics}} and the settings to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    args.seeds, args.opts = split_seeds(args.seeds, args.opts, parser)
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = adapt_to_machine(get_regionssl_cfg(args.config_file, args.opts), world_size=1)
    weights = args.weights or cfg.MODEL.WEIGHTS
    columns = []
    if weights:
        columns.append(("checkpoint", weights))
    if args.random_init or not weights:
        columns.append(("random init", None))
    results = {}  # column -> seed -> metrics
    for name, w in columns:
        model = build(cfg, args.init_seed, w)
        results[name] = {}
        for seed in args.seeds:
            start = time.perf_counter()
            results[name][seed] = run_probe(model, cfg, dataset=args.dataset, max_images=args.max_images, seed=seed)
            results[name][seed]["seconds"] = time.perf_counter() - start
    print(f"probe: {cfg.MODEL.META_ARCHITECTURE} ({args.config_file}), dataset "
          f"{args.dataset or cfg.TEST.REGIONSSL.PROBE_DATASET}, crop {cfg.TEST.REGIONSSL.PROBE_CROP_SIZE}")
    if weights:
        print(f"checkpoint: {weights}")
    for seed in args.seeds:
        print(f"\nseed {seed}")
        print_table({n: results[n][seed] for n, _ in columns}, ROWS + ("seconds",))
    if len(args.seeds) > 1:
        print(f"\nmean over seeds {', '.join(map(str, args.seeds))} (min - max)")
        summary = {}
        for n, _ in columns:
            values = {row: [results[n][seed][row] for seed in args.seeds] for row in ("top1", "image_top1")}
            summary[n] = {row: f"{sum(v) / len(v):.3f} ({min(v):.3f} - {max(v):.3f})" for row, v in values.items()}
        print_table(summary, ("top1", "image_top1"))
    if args.output_json:
        write_json(args.output_json, {
            "config": args.config_file, "weights": weights, "dataset": args.dataset or cfg.TEST.REGIONSSL.PROBE_DATASET,
            "crop": cfg.TEST.REGIONSSL.PROBE_CROP_SIZE, "seeds": args.seeds,
            "results": {n: {str(seed): m for seed, m in r.items()} for n, r in results.items()},
        })
    return results


def write_json(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder (never a torn file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

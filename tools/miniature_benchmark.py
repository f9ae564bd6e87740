#!/usr/bin/env python
"""The miniature transfer benchmark, end to end: pretrain the miniature recipes, fine-tune Mask R-CNN
from them under the full and the frozen-trunk protocol, and the scaling curve.

    python tools/miniature_benchmark.py --output output/miniature --report docs/results/miniature

Stages, in order (``--stages`` picks some); each resumes, so the same command continues a stopped run:

1. ``pretrain``: every recipe ``configs/miniature/<recipe>.yaml`` (``--recipes``: all of them by
   default) in ``OUTPUT/pretrain/<recipe>`` (``train_net.py --resume``), ``--jobs`` at a time;
2. ``probe``: the held-out retrieval probe of each final checkpoint beside random init (probe seeds
   0 1 2, same views), ``OUTPUT/pretrain/<recipe>/probe.json``;
3. ``full``: ``tools/transfer.py`` under the full fine-tuning protocol (``--full-config``), random init
   and every recipe, ``--seeds``, in ``OUTPUT/full``;
4. ``frozen``: the same under the frozen-trunk protocol (``--frozen-config``: the trunk keeps the
   pretrained weights and BN statistics, FPN and heads train) in ``OUTPUT/frozen``;
5. ``scaling``: the full protocol from the checkpoint after each of ``--budgets`` steps of the
   ``--scaling-recipes`` (the recipes keep a constant learning rate after warm-up, so the checkpoint
   after B steps is the B-step budget), in ``OUTPUT/full``, beside the finished runs of stage 3.

``--report DIR`` writes the tables (``full.md``, ``frozen.md``, ``scaling.md``, ``probe.md``), the
scaling curve (``scaling.png``) and every number (``results.json``) from whatever has finished.
Fine-tunes run ``--jobs`` at a time with cores / jobs threads each (tools/transfer.py).
"""
import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys

from regionssl.transfer import (
    TransferError, budget_model_name, check_run_identity, config_identity, paired_cell, paired_gains, plot_scaling,
    scaling_names, scaling_points, scaling_table,
)
from regionssl_workbench.scripts import load_script

transfer = load_script(os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer.py"))  # tools/transfer.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES_DIR = os.path.join(REPO, "configs", "miniature")
STAGES = ("pretrain", "probe", "full", "frozen", "scaling")
PROBE_SEEDS = ("0", "1", "2")


def recipe_names():
    """The miniature recipes: one per ``configs/miniature/<recipe>.yaml``."""
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(RECIPES_DIR, "*.yaml")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/miniature")
    p.add_argument("--recipes", nargs="+", default=None, help="default: every configs/miniature/*.yaml")
    p.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES),
                   help="stages to run (default: all); none (--stages with no value) with --report: tabulate only")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--scaling-recipes", nargs="+", default=["mocov2", "insloc_fpn"])
    p.add_argument("--budgets", nargs="+", type=int, default=[250, 500, 1000],
                   help="pretraining steps below the recipes' MAX_ITER (multiples of their CHECKPOINT_PERIOD)")
    p.add_argument("--full-config", default="configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml")
    p.add_argument("--frozen-config", default="configs/finetune/minidet_mask_rcnn_R_50_FPN_mini_frozen.yaml")
    p.add_argument("--jobs", type=int, default=2, help="pretrainings / fine-tunes at a time (CPU machines)")
    p.add_argument("--report", default=None, metavar="DIR", help="write tables, the scaling curve and results.json")
    args = p.parse_args(argv)
    known = recipe_names()
    args.recipes = args.recipes or known
    for name in args.recipes + args.scaling_recipes:
        if name not in known:
            p.error(f"no recipe {name!r}: configs/miniature/ has {', '.join(known)}")
    return args


def _say(msg):
    print("[miniature] " + msg, flush=True)


def _threads(jobs):
    return None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // max(jobs, 1))


# ----------------------------------------------------------------------------- pretraining
def pretrain_dir(args, recipe):
    return os.path.abspath(os.path.join(args.output, "pretrain", recipe))


def pretrain_cfg(args, recipe):
    spec = transfer.parse_model_spec(f"{recipe}={os.path.join(RECIPES_DIR, recipe + '.yaml')}")
    return transfer.pretrain_cfg(spec, argparse.Namespace(pretrain_opts=[]), pretrain_dir(args, recipe))


def budget_checkpoint(args, recipe, budget):
    """The checkpoint after ``budget`` steps: Detectron2 names it by its last iteration (budget - 1)."""
    cfg = pretrain_cfg(args, recipe)
    if budget >= cfg.SOLVER.MAX_ITER or budget % cfg.SOLVER.CHECKPOINT_PERIOD:
        raise TransferError(f"Budget {budget} of {recipe!r} is not a checkpoint below MAX_ITER {cfg.SOLVER.MAX_ITER} "
                            f"(CHECKPOINT_PERIOD {cfg.SOLVER.CHECKPOINT_PERIOD}).")
    return os.path.join(pretrain_dir(args, recipe), f"model_{budget - 1:07d}.pth")


def final_checkpoint(args, recipe):
    return os.path.join(pretrain_dir(args, recipe), "model_final.pth")


def pretrain_all(args):
    """Pretrain every recipe without a final checkpoint, ``--jobs`` at a time; identity-checked first."""
    todo = []
    for recipe in args.recipes:
        cfg = pretrain_cfg(args, recipe)
        identity = config_identity(cfg.dump())
        check_run_identity(cfg.OUTPUT_DIR, identity)
        if os.path.isfile(final_checkpoint(args, recipe)):
            _say(f"{recipe}: pretraining found in {cfg.OUTPUT_DIR}")
        else:
            todo.append((recipe, cfg, identity))

    def one(recipe, cfg, identity):
        _say(f"{recipe}: pretraining -> {cfg.OUTPUT_DIR}")
        seconds, _ = transfer.run_train_net(cfg, identity, cfg.OUTPUT_DIR, 1, threads=_threads(args.jobs))
        _say(f"{recipe}: pretrained in {seconds / 60:.1f} min")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, *job) for job in todo]:
            future.result()


def probe_all(args):
    """Held-out retrieval probe of each final checkpoint beside random init (skipped when done)."""
    for recipe in args.recipes:
        out = os.path.join(pretrain_dir(args, recipe), "probe.json")
        if os.path.isfile(out):
            continue
        _say(f"{recipe}: probing the final checkpoint beside random init -> {out}")
        cmd = [sys.executable, os.path.join(REPO, "tools", "probe.py"), "--config-file",
               os.path.join(RECIPES_DIR, recipe + ".yaml"), "--weights", final_checkpoint(args, recipe),
               "--random-init", "--seeds", *PROBE_SEEDS, "--output-json", out]
        env = dict(os.environ, OMP_NUM_THREADS=str(_threads(1) or os.environ["OMP_NUM_THREADS"]))
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- fine-tuning
def _transfer(args, protocol_config, output, models):
    argv = ["--finetune-config", protocol_config, "--output", output, "--jobs", str(args.jobs),
            "--seeds", *map(str, args.seeds), "--models", *models]
    return transfer.run(transfer.parse_args(argv))


def table_models(args):
    return ["random"] + [f"{r}={final_checkpoint(args, r)}" for r in args.recipes]


def scaling_models(args):
    return [f"{budget_model_name(r, b)}={budget_checkpoint(args, r, b)}" for r in args.scaling_recipes for b in args.budgets]


# ----------------------------------------------------------------------------- report
def finished_models(folder):
    """Every finished fine-tune under ``folder/finetune/<model>/seed<S>/`` (its transfer_metrics.json), as
    transfer.json's ``models`` entries (name, runs, summary); read from the run directories, so runs of
    several tools/transfer.py calls on one folder all count."""
    models = {}
    for path in sorted(glob.glob(os.path.join(folder, "finetune", "*", "seed*", transfer.METRICS_FILE))):
        run_dir = os.path.dirname(path)
        with open(path) as f:
            entry = json.load(f)
        name, seed = os.path.basename(os.path.dirname(run_dir)), os.path.basename(run_dir)[len("seed"):]
        models.setdefault(name, {})[seed] = entry
    return [{"name": n, "runs": runs, "summary": transfer.summarize({s: e["results"] for s, e in runs.items()})}
            for n, runs in models.items()]


PAIRED_NOTE = ("Paired with random init: box AP minus random init's at the same fine-tuning seed (same new-layer "
               "initialisation and image order), mean (each seed; how many above 0).")


def paired_with_random(models):
    """``{model: {seed: box AP minus random init's at that seed}}`` for the finished ``models``."""
    runs = {m["name"]: {s: e["results"] for s, e in m["runs"].items()} for m in models}
    base = runs.get("random", {})
    return {name: paired_gains(r, base) for name, r in runs.items() if name != "random"}


def write_report(args):
    os.makedirs(args.report, exist_ok=True)
    full = finished_models(os.path.join(args.output, "full"))
    frozen = finished_models(os.path.join(args.output, "frozen"))
    table_names = ["random"] + list(args.recipes)
    results = {"full": {}, "frozen": {}, "probe": {}, "scaling": {}}
    vs_random = {"full": paired_with_random(full), "frozen": paired_with_random(frozen)}
    for key, models in (("full", full), ("frozen", frozen)):
        rows = [(m["name"], len(m["runs"]), m["summary"]) for m in models if m["name"] in table_names]
        rows.sort(key=lambda r: table_names.index(r[0]))
        if rows:
            config = args.full_config if key == "full" else args.frozen_config
            paired = [f"| {name} | {paired_cell(vs_random[key][name])} |" for name, _, _ in rows if vs_random[key].get(name)]
            with open(os.path.join(args.report, f"{key}.md"), "w") as f:
                f.write(transfer.markdown_table(rows, f"Protocol `{config}`"))
                if paired:
                    f.write(f"\n{PAIRED_NOTE}\n\n| model | box AP minus random init |\n|---|---|\n" + "\n".join(paired) + "\n")
        results[key] = {m["name"]: {"box AP": m["summary"].get("box AP"), "mask AP": m["summary"].get("mask AP"),
                                    "box AP minus random init": vs_random[key].get(m["name"])} for m in models}
    curves, paired_curves = {}, {}
    for recipe in args.scaling_recipes:
        final = pretrain_cfg(args, recipe).SOLVER.MAX_ITER
        curves[recipe] = scaling_points(full, recipe, args.budgets, final)
        paired_curves[recipe] = {b: vs_random["full"].get(name, {}) for b, name in scaling_names(recipe, args.budgets, final) if b}
        results["scaling"][recipe] = [{"steps": b, "box AP": s} for b, s in curves[recipe]]
    if any(s for points in curves.values() for _, s in points):
        budgets = sorted({b for points in paired_curves.values() for b in points})
        paired = [f"| {b} | " + " | ".join(paired_cell(paired_curves[r].get(b, {})) for r in curves) + " |" for b in budgets]
        with open(os.path.join(args.report, "scaling.md"), "w") as f:
            f.write(f"Protocol `{args.full_config}`, box AP against pretraining steps\n\n" + scaling_table(curves))
            f.write(f"\n{PAIRED_NOTE}\n\n| pretraining steps | " + " | ".join(curves) + " |\n|---:|" + "---|" * len(curves)
                    + "\n" + "\n".join(paired) + "\n")
        plot_scaling(curves, os.path.join(args.report, "scaling.png"), title="box AP vs pretraining budget",
                     paired={r: list(points.items()) for r, points in paired_curves.items()})
    lines = ["| recipe | region top-1 | random init | paired gain (per seed) |", "|---|---:|---:|---|"]
    for recipe in args.recipes:
        path = os.path.join(pretrain_dir(args, recipe), "probe.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            probe = json.load(f)["results"]
        ours = [probe["checkpoint"][s]["top1"] for s in PROBE_SEEDS]
        rand = [probe["random init"][s]["top1"] for s in PROBE_SEEDS]
        gains = [a - b for a, b in zip(ours, rand)]
        results["probe"][recipe] = {"top1": ours, "random_init_top1": rand}
        lines.append(f"| {recipe} | {sum(ours) / 3:.3f} ({min(ours):.3f}-{max(ours):.3f}) | {sum(rand) / 3:.3f} "
                     f"({min(rand):.3f}-{max(rand):.3f}) | {', '.join(f'{g:+.3f}' for g in gains)} |")
    if len(lines) > 2:
        with open(os.path.join(args.report, "probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n\nRegion top-1 on the held-out photos (regionssl_photos_heldout), probe "
                    "seeds 0 1 2: mean (min-max).\n")
    with open(os.path.join(args.report, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    _say(f"report written to {args.report}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if "pretrain" in args.stages:
            pretrain_all(args)
        if "probe" in args.stages:
            probe_all(args)
        if "full" in args.stages:
            _transfer(args, args.full_config, os.path.join(args.output, "full"), table_models(args))
        if "frozen" in args.stages:
            _transfer(args, args.frozen_config, os.path.join(args.output, "frozen"), table_models(args))
        if "scaling" in args.stages:
            _transfer(args, args.full_config, os.path.join(args.output, "full"), table_models(args) + scaling_models(args))
    except TransferError as e:
        sys.exit(f"tools/miniature_benchmark.py: {e}")
    finally:
        if args.report:
            write_report(args)


if __name__ == "__main__":
    main()

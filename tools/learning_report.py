#!/usr/bin/env python
"""Is every method learning? Pretrain the short CPU recipes, probe them against random init, report.

    python tools/learning_report.py --output output/learning                 # every recipe, in order
    python tools/learning_report.py --output output/learning --only insloc_c4 mocov2
    python tools/learning_report.py --output output/learning --report docs/results/learning   # table + curves

For each recipe (``configs/quick_schedules/<name>_probe_demo.yaml``) it runs ``train_net.py`` in
``<output>/<name>`` (skipped when ``model_final.pth`` exists, resumed when a checkpoint exists), then
the retrieval probe (``regionssl/probe.py``) of the final checkpoint and of the same architecture at
random initialisation for probe seeds 0, 1, 2, written to ``<output>/<name>/probe.json`` (skipped
when present and made under the recipe's current probe settings). An interrupted report therefore resumes where it stopped. ``--report DIR`` writes
``learning.md`` (per recipe: loss at start and end vs the chance level, embedding std, region and
photo top-1 as mean and min-max over the seeds, minutes of training) and ``learning_curves.png``.
Runs are one process; the recipes are written for one core (``OMP_NUM_THREADS=1``).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

from regionssl_workbench.recipes import learning_recipes, probe_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPES = learning_recipes()  # every recipe with a configs/quick_schedules/<name>_probe_demo.yaml
# a two-stage recipe -> the recipe whose checkpoint it starts from (CVSA's stage 2 from BYOL's stage 1)
FIRST_STAGE = {"cvsa": "byol"}
SEEDS = (0, 1, 2)


def config_path(name):
    return probe_demo(name)


def pretrain(name, out):
    run = os.path.join(out, name)
    final = os.path.join(run, "model_final.pth")
    if os.path.isfile(final):
        return
    extra = ["MODEL.WEIGHTS", os.path.join(out, FIRST_STAGE[name], "model_final.pth")] if name in FIRST_STAGE else []
    if "MODEL.WEIGHTS" in extra and not os.path.isfile(extra[extra.index("MODEL.WEIGHTS") + 1]):
        raise FileNotFoundError(f"{name} starts from {extra[extra.index('MODEL.WEIGHTS') + 1]}: run its stage 1 first")
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config_path(name)]
    if os.path.isfile(os.path.join(run, "last_checkpoint")):
        cmd.append("--resume")
    cmd += ["OUTPUT_DIR", run] + extra
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(run, "train_seconds.json"), "w") as f:
        json.dump({"seconds": time.time() - start}, f)


def probe_protocol(name):
    """The probe settings of a recipe; a probe.json written under other settings is recomputed."""
    from regionssl.engine import get_regionssl_cfg

    t = get_regionssl_cfg(config_path(name)).TEST.REGIONSSL
    keys = ("PROBE_DATASET", "PROBE_ONE_PER_GROUP", "PROBE_MAX_IMAGES", "PROBE_CROP_SIZE", "PROBE_ROUNDS", "PROBE_GRID")
    return {k: t[k] for k in keys} | {"seeds": list(SEEDS)}


def probe(name, out):
    path = os.path.join(out, name, "probe.json")
    protocol = probe_protocol(name)
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done.get("protocol") == protocol:
            return done
        print(f"[learning_report] {path} was probed under other settings: probing again", flush=True)
    from regionssl_workbench.scripts import load_script

    probe_main = load_script(os.path.join(ROOT, "tools", "probe.py")).main

    weights = os.path.join(out, name, "model_final.pth")
    results = probe_main(["--config-file", config_path(name), "--weights", weights, "--random-init",
                          "--seeds", *map(str, SEEDS)])
    done = {col: {str(s): r for s, r in per_seed.items()} for col, per_seed in results.items()}
    with open(path + ".tmp", "w") as f:
        json.dump(dict(done, protocol=protocol), f, indent=1)
    os.replace(path + ".tmp", path)  # an interrupted probe leaves no probe.json behind
    return probe(name, out)


def single_loss(cfg):
    """The name of the model's loss when it has one learning signal (Detectron2 then logs only
    ``total_loss``), from the model's own ``learning_signals()``; else None."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    signals = build_model(cfg).learning_signals()
    return signals[0].loss if len(signals) == 1 else None


def read_metrics(run, single_loss_name=None):
    """Training rows of ``metrics.json`` (the last pass over each iteration); a row with no loss term
    but ``total_loss`` also gets it as ``single_loss_name``."""
    rows = []
    with open(os.path.join(run, "metrics.json")) as f:
        for line in f:
            d = json.loads(line)
            if "iteration" in d and "total_loss" in d:
                if not any(k.startswith("loss_") for k in d) and single_loss_name:
                    d[single_loss_name] = d["total_loss"]
                # a restarted or resumed run appends to the file: its rows replace the ones it redoes
                if rows and rows[-1]["iteration"] >= d["iteration"]:
                    rows = [r for r in rows if r["iteration"] < d["iteration"]]
                rows.append(d)
    return rows


def chance_levels(cfg, metrics_row):
    """{loss key: chance-level loss} for the InfoNCE / swapped-prediction losses of a run."""
    r = cfg.MODEL.REGIONSSL
    out = {}
    for key in metrics_row:
        if not key.startswith("loss_"):
            continue
        if key.startswith("loss_swav"):
            out[key] = math.log(r.SWAV.NUM_PROTOTYPES)
        elif key.startswith(("loss_contrast", "loss_instance")):
            k = r.QUEUE.SIZE if r.QUEUE.SIZE > 0 else cfg.SOLVER.IMS_PER_BATCH - 1
            out[key] = math.log(k + 1)
        elif key.startswith("loss_region"):
            level = key[len("loss_region_"):]
            n = metrics_row.get(f"regionssl/num_neg_{level}")
            if n:
                out[key] = math.log(n + 1)
    return out


def training_seconds(run):
    """Wall seconds of the pretraining: ``train_seconds.json`` (this tool's runs), else the last
    "Total training time" of Detectron2's log (a run started by hand or resumed elsewhere)."""
    path = os.path.join(run, "train_seconds.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["seconds"]
    found = re.findall(r"Total training time: (\d+):(\d+):(\d+)", open(os.path.join(run, "log.txt")).read())
    if not found:
        return float("nan")
    h, m, s = map(int, found[-1])
    return 3600 * h + 60 * m + s


def _signed_stat(values):
    return f"{sum(values) / len(values):+.3f} ({min(values):+.3f} to {max(values):+.3f})"


def _stat(values):
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summarize(name, out):
    from regionssl.engine import get_regionssl_cfg

    run = os.path.join(out, name)
    cfg = get_regionssl_cfg(config_path(name))
    rows = read_metrics(run, single_loss(cfg))
    first, last = rows[0], rows[-1]
    chance = chance_levels(cfg, last)
    losses = []
    for key in sorted(k for k in last if k.startswith("loss_")):
        c = f" / {chance[key]:.2f}" if key in chance else ""
        losses.append(f"{key[5:]} {first[key]:.2f} → {last[key]:.2f}{c}")
    std_keys = sorted(k for k in last if k.startswith("regionssl/emb_std"))
    stds = ", ".join(f"{first[k]:.3f} → {last[k]:.3f}" for k in std_keys[:1])
    p = probe(name, out)
    ck, rnd = p["checkpoint"], p["random init"]
    seconds = training_seconds(run)
    return {
        "name": name,
        "losses": "; ".join(losses),
        "emb_std": stds,
        "region": _stat([ck[s]["top1"] for s in ck]),
        "region_random": _stat([rnd[s]["top1"] for s in rnd]),
        "image": _stat([ck[s]["image_top1"] for s in ck]),
        "image_random": _stat([rnd[s]["image_top1"] for s in rnd]),
        "apart": min(ck[s]["top1"] for s in ck) > max(rnd[s]["top1"] for s in rnd),
        # a probe seed shows both models the same views: the per-seed difference is the paired gain
        "gain": _signed_stat([ck[s]["top1"] - rnd[s]["top1"] for s in ck]),
        "gain_seeds": sum(ck[s]["top1"] > rnd[s]["top1"] for s in ck),
        "minutes": seconds / 60,
        "chance": next(iter(ck.values()))["chance"],
        "curve": [(r["iteration"], {k: r[k] for k in r if k.startswith("loss_")}) for r in rows],
        "chance_levels": chance,
    }


def write_report(summaries, folder):
    os.makedirs(folder, exist_ok=True)
    lines = [
        "| recipe | losses: first → last logged / chance | emb_std first → last | region top-1 | random init | "
        "photo top-1 | random init | region gain (paired) | seeds apart | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(f"| {s['name']} | {s['losses']} | {s['emb_std']} | **{s['region']}** | {s['region_random']} | "
                     f"{s['image']} | {s['image_random']} | {s['gain']}, {s['gain_seeds']}/{len(SEEDS)} seeds > 0 | "
                     f"{'yes' if s['apart'] else 'no'} | {s['minutes']:.0f} |")
    chance = summaries[0]["chance"] if summaries else float("nan")
    lines.append(f"\nRegion top-1 chance: {chance:.4f}. Mean (min-max) over probe seeds {', '.join(map(str, SEEDS))}; "
                 "region gain: checkpoint minus random init on the same views, per seed.")
    with open(os.path.join(folder, "learning.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "learning.json"), "w") as f:
        json.dump(summaries, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summaries)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, s in zip(axes.flat, summaries):
        its = [it for it, _ in s["curve"]]
        for key in s["curve"][-1][1]:
            ax.plot(its, [l.get(key, float("nan")) for _, l in s["curve"]], label=key[5:])
            if key in s["chance_levels"]:
                ax.axhline(s["chance_levels"][key], ls="--", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_title(s["name"], fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("training losses (dashed: chance level ln(K+1) / ln K)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "learning_curves.png"), dpi=80)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/learning", help="one run folder per recipe")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="these recipes only (default: all)")
    parser.add_argument("--report", default=None, help="write learning.md/.json and learning_curves.png here")
    args = parser.parse_args(argv)
    names = args.only or list(RECIPES)
    for name in names:
        pretrain(name, args.output)
        probe(name, args.output)
        print(f"[learning_report] {name}: done", flush=True)
    if args.report:
        done = [n for n in RECIPES if os.path.isfile(os.path.join(args.output, n, "probe.json"))]
        write_report([summarize(n, args.output) for n in done], args.report)


if __name__ == "__main__":
    main()

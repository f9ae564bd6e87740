#!/usr/bin/env python
"""Transfer benchmark: fine-tune Mask R-CNN from each model for several seeds under one protocol.

    python tools/transfer.py --finetune-config configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml \
        --seeds 0 1 2 --output output/transfer \
        --models random mocov2=configs/mocov2.yaml insloc=output/insloc_fpn/model_final.pth

A model is ``random`` (random initialisation), a pretraining checkpoint, or a pretraining config,
optionally named ``NAME=...``. Missing pretrainings run first (``OUTPUT/pretrain/NAME``; reused once
its ``model_final.pth`` exists). Every (model, seed) fine-tunes with ``train_net.py`` in
``OUTPUT/finetune/NAME/seedS`` (``SEED S``) and is evaluated by the protocol's evaluator (COCO for
Mask R-CNN). Finished runs are reused and interrupted ones resume, so re-running the same command
continues an interrupted benchmark; a run directory made from another config or other weights stops
it with one message, before anything is overwritten. Writes ``OUTPUT/transfer.md`` (mean and
min-max over seeds of box/mask AP, AP50, AP75), ``OUTPUT/transfer.png`` (error bars) and
``OUTPUT/transfer.json`` (every run's metrics and timings).

On GPUs the same command runs the published protocols: give a COCO config from configs/finetune/
and ``--num-gpus 8``. On a CPU ``--num-gpus N`` runs N processes (SyncBN -> naiveSyncBN), and
``--jobs J`` fine-tunes J (model, seed) runs at a time, each with cores / J torch threads (two
one-thread runs side by side did 18 % more work than one two-thread run on a 2-core machine).
"""
import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "train_net.py")

from regionssl.transfer import (
    METRICS_FILE, RUN_FILE, TransferError, check_run_identity, config_identity, file_sha1, markdown_table,
    parse_model_spec, plot_summary, read_eval_metrics, read_timings, summarize,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune-config", required=True, help="the one fine-tuning protocol (configs/finetune/...)")
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]random|CHECKPOINT|PRETRAIN_CONFIG")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds (default: 0 1 2)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per run (GPUs, or CPU processes)")
    p.add_argument("--output", default="output/transfer")
    p.add_argument("--finetune-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="overrides of the fine-tuning config (part of every run's identity)")
    p.add_argument("--pretrain-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="overrides of every pretraining config given in --models")
    p.add_argument("--train-net", default=TRAIN_NET,
                   help="entry point of every run (default: train_net.py; tools/train_net_tiny.py for "
                        "fine-tuning configs on the tiny synthetic sets, which are test data)")
    p.add_argument("--jobs", type=int, default=1,
                   help="fine-tunes run at a time (CPU machines; each gets cores / JOBS torch threads unless "
                        "OMP_NUM_THREADS is set). Keep 1 on GPUs, where one run uses all of --num-gpus")
    p.add_argument("--report-only", action="store_true",
                   help="tabulate the finished runs only (e.g. of a benchmark still running): start nothing; "
                        "each model's row counts the seeds it has")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep intermediate fine-tuning checkpoints (default: only model_final.pth is kept)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- configs
def _load_cfg(path, opts, what):
    from regionssl.engine import get_regionssl_cfg

    try:
        return get_regionssl_cfg(path, opts)
    except FileNotFoundError as e:
        raise TransferError(f"{what} {path!r} does not exist.") from e
    except (KeyError, ValueError, AssertionError) as e:
        raise TransferError(f"{what} {path!r} (with overrides {list(opts)}) does not load: {e}") from e


def finetune_cfg(args, weights, seed, run_dir):
    """The resolved fine-tuning config of one run; TransferError if it is not a fine-tune config."""
    from regionssl.engine import is_pretraining

    cfg = _load_cfg(args.finetune_config, args.finetune_opts, "Fine-tuning config")
    if is_pretraining(cfg):
        raise TransferError(f"{args.finetune_config!r} is not a fine-tuning config: MODEL.META_ARCHITECTURE "
                            f"{cfg.MODEL.META_ARCHITECTURE!r} is a pretraining model. Give a detector config, "
                            "e.g. configs/finetune/minidet_mask_rcnn_R_50_FPN_mini.yaml.")
    if not cfg.DATASETS.TEST:
        raise TransferError(f"Fine-tuning config {args.finetune_config!r} has no DATASETS.TEST to evaluate on.")
    cfg.MODEL.WEIGHTS = weights
    cfg.SEED = seed
    cfg.OUTPUT_DIR = run_dir
    return cfg


def pretrain_cfg(spec, args, run_dir):
    from regionssl.engine import is_pretraining

    cfg = _load_cfg(spec.path, args.pretrain_opts, "Pretraining config")
    if not is_pretraining(cfg):
        raise TransferError(f"{spec.path!r} (model {spec.name!r}) is not a pretraining config: MODEL.META_ARCHITECTURE "
                            f"{cfg.MODEL.META_ARCHITECTURE!r} is not a regionssl pretraining model.")
    cfg.OUTPUT_DIR = run_dir
    return cfg


# ----------------------------------------------------------------------------- runs
def run_train_net(cfg, identity, run_dir, num_gpus, train_net=TRAIN_NET, threads=None):
    """Write the run's identity and resolved config, then ``train_net --resume`` on it (``train_net.py``
    or a script with its interface; output appended to ``run_dir/transfer.log``; ``threads``: its
    OMP_NUM_THREADS, if given). Returns (seconds, log text); TransferError if it fails."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, RUN_FILE), "w") as f:
        json.dump(identity, f, indent=1)
    config_file = os.path.join(run_dir, "transfer_config.yaml")
    with open(config_file, "w") as f:
        f.write(identity["config"])
    log_file = os.path.join(run_dir, "transfer.log")
    cmd = [sys.executable, os.path.abspath(train_net), "--config-file", config_file, "--num-gpus", str(num_gpus),
           "--resume"]
    start = time.perf_counter()
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    with open(log_file) as f:
        text = f.read()
    if code != 0:
        raise TransferError(f"{os.path.basename(train_net)} failed (exit {code}) in {run_dir!r}; see {log_file}. "
                            "Run the same command again to resume once the cause is fixed.")
    return seconds, text


def _remove_intermediate_checkpoints(run_dir):
    for name in os.listdir(run_dir):
        if re.match(r"^model_\d+\.pth$", name):
            os.remove(os.path.join(run_dir, name))


def plan(args):
    """Check every input and every existing run directory before anything runs.

    Returns the list of (spec, pretrain cfg or None) in order. Raises TransferError.
    """
    specs = [parse_model_spec(m) for m in args.models]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TransferError(f"Two models are named {dup[0]!r}; name them NAME=... to tell them apart.")
    if len(set(args.seeds)) != len(args.seeds):
        raise TransferError(f"--seeds repeats a seed: {args.seeds}")
    if args.jobs < 1:
        raise TransferError(f"--jobs must be at least 1, not {args.jobs}")
    out = []
    for spec in specs:
        pcfg = None
        if spec.kind == "config":
            pdir = os.path.join(args.output, "pretrain", spec.name)
            pcfg = pretrain_cfg(spec, args, pdir)
            check_run_identity(pdir, config_identity(pcfg.dump()))
        weights = _weights_path(spec, args)
        # the weights' checksum is known now unless a pretraining is still to run
        known = not weights or os.path.isfile(weights)
        sha = file_sha1(weights) if weights and known else None
        for seed in args.seeds:
            run_dir = _run_dir(args, spec, seed)
            check_run_identity(run_dir, config_identity(finetune_cfg(args, weights, seed, run_dir).dump(), sha),
                               check_weights=known)
        out.append((spec, pcfg))
    return out


def _weights_path(spec, args):
    if spec.kind == "random":
        return ""
    if spec.kind == "checkpoint":
        return os.path.abspath(spec.path)
    return os.path.abspath(os.path.join(args.output, "pretrain", spec.name, "model_final.pth"))


def _run_dir(args, spec, seed):
    return os.path.abspath(os.path.join(args.output, "finetune", spec.name, f"seed{seed}"))


def _say(msg):
    print("[transfer] " + msg, flush=True)


def run(args):
    """The benchmark. Returns the JSON-able result (also written to OUTPUT/transfer.json)."""
    args.output = os.path.abspath(args.output)
    planned = plan(args)
    done = {"pretrained": [], "finetuned": [], "reused": []}
    rows, models = [], []
    for spec, pcfg in planned:
        if pcfg is not None and not args.report_only:
            pdir = pcfg.OUTPUT_DIR
            if os.path.isfile(os.path.join(pdir, "model_final.pth")):
                _say(f"{spec.name}: pretraining found in {pdir}")
            else:
                _say(f"{spec.name}: pretraining {spec.path} -> {pdir}")
                seconds, _ = run_train_net(pcfg, config_identity(pcfg.dump()), pdir, args.num_gpus, args.train_net)
                if not os.path.isfile(os.path.join(pdir, "model_final.pth")):
                    raise TransferError(f"Pretraining in {pdir!r} ended without model_final.pth; see its transfer.log.")
                done["pretrained"].append(spec.name)
                _say(f"{spec.name}: pretrained in {seconds / 60:.1f} min")
    # every (model, seed): its config and identity; the ones without results are fine-tuned below
    jobs, per_model = [], []
    for spec, _ in planned:
        weights = _weights_path(spec, args)
        sha = file_sha1(weights) if weights and os.path.isfile(weights) else None
        seeds = []
        for seed in args.seeds:
            run_dir = _run_dir(args, spec, seed)
            cfg = finetune_cfg(args, weights, seed, run_dir)
            identity = config_identity(cfg.dump(), sha)
            check_run_identity(run_dir, identity)
            if os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
                done["reused"].append((spec.name, seed))
                _say(f"{spec.name} seed {seed}: finished run reused ({run_dir})")
            elif args.report_only:
                _say(f"{spec.name} seed {seed}: not finished, left out ({run_dir})")
                continue
            else:
                jobs.append((spec.name, seed, cfg, identity))
            seeds.append((seed, run_dir))
        per_model.append((spec, weights, sha, seeds))
    jobs.sort(key=lambda job: args.seeds.index(job[1]))  # seed-major: stopped early, every model has seed 0
    threads = None
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    errors = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # threads wait on processes
        futures = [pool.submit(_finetune, args, *job, threads) for job in jobs]
        for job, future in zip(jobs, futures):
            try:
                future.result()
                done["finetuned"].append(job[:2])
            except TransferError as e:
                errors.append(e)  # the other runs finish and keep their results; the first error is raised
    if errors:
        raise errors[0]
    for spec, weights, sha, seeds in per_model:
        runs, entries = {}, {}
        for seed, run_dir in seeds:
            with open(os.path.join(run_dir, METRICS_FILE)) as f:
                entry = json.load(f)
            runs[seed] = entry["results"]
            entries[str(seed)] = entry
        if not runs:
            continue  # --report-only, no finished seed
        summary = summarize(runs)
        rows.append((spec.name, len(runs), summary))
        models.append({"name": spec.name, "kind": spec.kind, "spec": spec.path, "weights": weights,
                       "weights_sha1": sha, "runs": entries, "summary": summary})
    title = (f"Fine-tuning protocol `{args.finetune_config}`"
             + (f" with `{' '.join(args.finetune_opts)}`" if args.finetune_opts else "")
             + f", seeds {' '.join(map(str, args.seeds))}"
             + (" (finished runs only)" if args.report_only else ""))
    table = markdown_table(rows, title)
    result = {"finetune_config": args.finetune_config, "finetune_opts": args.finetune_opts, "seeds": args.seeds,
              "num_gpus": args.num_gpus, "models": models, "timing": _timing(models)}
    os.makedirs(args.output, exist_ok=True)
    paths = {k: os.path.join(args.output, "transfer." + k) for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(table)
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    plot_summary(rows, paths["png"], title=os.path.basename(args.finetune_config))
    print("\n" + table)
    t = result["timing"]
    if t.get("runs"):
        _say(f"timing: {t['runs']} runs, median {t['median_run_minutes']:.1f} min per fine-tune + evaluation"
             + (f", {t['median_seconds_per_iteration']:.2f} s/iteration" if "median_seconds_per_iteration" in t else "")
             + (f", {t['median_seconds_per_image']:.2f} s/evaluated image" if "median_seconds_per_image" in t else ""))
    _say("wrote " + ", ".join(paths.values()))
    result["done"] = done
    return result


def _finetune(args, name, seed, cfg, identity, threads):
    """Fine-tune and evaluate one (model, seed); writes its METRICS_FILE, the mark of a finished run."""
    run_dir = cfg.OUTPUT_DIR
    _say(f"{name} seed {seed}: fine-tuning -> {run_dir}")
    seconds, log_text = run_train_net(cfg, identity, run_dir, args.num_gpus, args.train_net, threads)
    results, iteration = read_eval_metrics(run_dir)
    if not results:
        raise TransferError(f"No evaluation results in {os.path.join(run_dir, 'metrics.json')}; "
                            f"see {os.path.join(run_dir, 'transfer.log')}.")
    entry = {"results": results, "iteration": iteration, "seconds": round(seconds, 1),
             "timings": read_timings(log_text), "weights": cfg.MODEL.WEIGHTS, "seed": seed}
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    with open(metrics_path + ".tmp", "w") as f:
        json.dump(entry, f, indent=1)
    os.replace(metrics_path + ".tmp", metrics_path)  # a finished run = this file exists
    if not args.keep_checkpoints:
        _remove_intermediate_checkpoints(run_dir)
    box = results.get("bbox", {}).get("AP", float("nan"))
    mask = results.get("segm", {}).get("AP", float("nan"))
    _say(f"{name} seed {seed}: box AP {box:.1f}, mask AP {mask:.1f} ({seconds / 60:.1f} min)")


def _timing(models):
    runs = [e for m in models for e in m["runs"].values()]
    out = {"runs": len(runs)}
    if runs:
        out["median_run_minutes"] = statistics.median(e["seconds"] for e in runs) / 60
        for key in ("seconds_per_iteration", "seconds_per_image"):
            values = [e["timings"][key] for e in runs if key in e.get("timings", {})]
            if values:
                out["median_" + key] = statistics.median(values)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except TransferError as e:
        sys.exit(f"tools/transfer.py: {e}")


if __name__ == "__main__":
    main()

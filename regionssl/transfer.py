"""Transfer benchmark: pretrained models x seeds fine-tuned under one detection protocol.

Used by ``tools/transfer.py``. A *model* is ``random`` (random initialisation), a pretraining
checkpoint, or a pretraining config (pretrained first, once). Each (model, seed) is one
``train_net.py`` fine-tune in its own run directory; its identity (the resolved config, and the
checksum of the weights it starts from) is stored there, so that

* a finished run (``transfer_metrics.json`` present) is reused, a partial one resumes with
  Detectron2's ``--resume``;
* a run directory made from anything else stops the benchmark with one message naming it,
  before anything is overwritten.

Results are summarised as mean and min-max range over seeds per metric (``summarize``), written
as a Markdown table, a JSON file and a PNG chart with error bars.
"""
import hashlib
import json
import math
import os
import re

from .utils.files import file_sha1

__all__ = [
    "METRICS", "ModelSpec", "TransferError", "parse_model_spec", "config_identity", "config_differences",
    "check_run_identity",
    "read_eval_metrics", "read_timings", "summarize", "markdown_table", "plot_summary", "file_sha1",
    "scaling_points", "scaling_names", "budget_model_name", "scaling_table", "plot_scaling", "paired_gains", "paired_cell",
]

# (evaluator task, metric) pairs in table order; labels as the papers write them.
METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"))
LABELS = {"bbox": "box", "segm": "mask"}
RUN_FILE = "transfer_run.json"  # identity of a run directory
METRICS_FILE = "transfer_metrics.json"  # written when a fine-tune has finished and been evaluated
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class TransferError(Exception):
    """Bad input for the benchmark; the message names the file or directory."""


class ModelSpec:
    """One row of the benchmark.

    Attributes:
        name: row label and run-directory name.
        kind: ``"random"``, ``"checkpoint"`` or ``"config"``.
        path: the checkpoint or pretraining config (None for random).
    """

    def __init__(self, name, kind, path=None):
        self.name, self.kind, self.path = name, kind, path

    def __repr__(self):
        return f"ModelSpec({self.name!r}, {self.kind!r}, {self.path!r})"


def parse_model_spec(text):
    """``random``, ``path.pth|.pkl`` or ``config.yaml``, optionally prefixed ``NAME=``.

    Default names: ``random``; a config's file stem; a checkpoint's stem, or its folder's name
    for Detectron2's ``model_final.pth`` / ``model_0001234.pth``.
    Raises TransferError naming a checkpoint or config that does not exist.
    """
    name, _, value = text.rpartition("=") if "=" in text else ("", "", text)
    if value == "random":
        spec = ModelSpec(name or "random", "random")
    elif value.endswith((".yaml", ".yml")):
        if not os.path.isfile(value):
            raise TransferError(f"Pretraining config {value!r} does not exist.")
        spec = ModelSpec(name or os.path.splitext(os.path.basename(value))[0], "config", value)
    else:
        if not os.path.isfile(value):
            raise TransferError(f"Checkpoint {value!r} does not exist (give 'random', a checkpoint file, "
                                "or a pretraining config .yaml).")
        stem = os.path.splitext(os.path.basename(value))[0]
        if re.match(r"^model_(final|\d+)$", stem):
            stem = os.path.basename(os.path.dirname(os.path.abspath(value)))
        spec = ModelSpec(name or stem, "checkpoint", value)
    if not _NAME.match(spec.name):
        raise TransferError(f"Model name {spec.name!r} (from {text!r}) must be letters, digits, '_', '.', '+', '-'.")
    return spec


def config_identity(cfg_text, weights_sha1=None):
    """What makes two runs the same: the resolved config (compared key by key, see
    ``config_differences``) and the weights' checksum; ``hash`` summarises both."""
    ident = {"config": cfg_text, "weights_sha1": weights_sha1}
    ident["hash"] = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def config_differences(old_text, new_text):
    """'KEY: old -> new' for every key that both dumped configs have, with different values.

    A key only one side has is not a difference: a config key added to the code later keeps the
    old behaviour at its default (the project's rule for new keys), so runs made before it remain
    valid. ``OUTPUT_DIR`` is where the run lies, not what it computed: a benchmark directory that
    was moved or copied elsewhere is still reused.
    """
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a, b = flat(yaml.safe_load(old_text) or {}), flat(yaml.safe_load(new_text) or {})
    keys = sorted((set(a) & set(b)) - {"OUTPUT_DIR"})
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


def check_run_identity(run_dir, identity, check_weights=True):
    """Compare a run directory with the identity a run would have now.

    Returns:
        "new" (no directory or an empty one) or "same" (a run of exactly this identity).
    Raises:
        TransferError naming the directory if it holds anything else: files but no identity
        (not made by the benchmark), or a run of a different config / different weights.
    """
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return "new"
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise TransferError(f"Run directory {run_dir!r} exists but was not made by tools/transfer.py (no {RUN_FILE}); "
                            "give another --output or remove it.")
    with open(path) as f:
        old = json.load(f)
    diff = config_differences(old.get("config", ""), identity["config"])
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise TransferError(f"Run directory {run_dir!r} was made from a different config ({'; '.join(diff[:3])}{more}); "
                            "nothing was overwritten. Give another --output, or remove that directory to redo the run.")
    if check_weights and old.get("weights_sha1") != identity["weights_sha1"]:
        raise TransferError(f"Run directory {run_dir!r} was fine-tuned from different weights (checksum "
                            f"{old.get('weights_sha1')} vs {identity['weights_sha1']}); nothing was overwritten. "
                            "Give another --output, or remove that directory to redo the run.")
    return "same"


def read_eval_metrics(run_dir):
    """The final evaluation of a Detectron2 run: ``{task: {metric: value}}`` from the last record of
    ``metrics.json`` that holds evaluation scalars (``bbox/AP``, ``segm/AP``, ...), and its iteration.
    Returns (None, None) if there is none."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None, None
    last = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by an interruption
                continue
            if any(k.startswith(("bbox/", "segm/")) for k in record):
                last = record
    if last is None:
        return None, None
    results = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm") and metric:
            results.setdefault(task, {})[metric] = value
    return results, last.get("iteration")


_TRAIN_SPEED = re.compile(r"Overall training speed: (\d+) iterations in (\d+):(\d+):(\d+) \(([\d.]+) s / it\)")
_INFERENCE = re.compile(r"Total inference time: (\d+):(\d+):([\d.]+) \(([\d.]+) s / iter per device, on (\d+) devices\)")


def read_timings(log_text):
    """Seconds per training iteration and per evaluated image from a Detectron2 log (last values)."""
    out = {}
    for m in _TRAIN_SPEED.finditer(log_text):
        out["train_iterations"] = int(m.group(1))
        out["train_seconds"] = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + int(m.group(4))
        out["seconds_per_iteration"] = float(m.group(5))
    for m in _INFERENCE.finditer(log_text):
        out["inference_seconds"] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        out["seconds_per_image"] = float(m.group(4))
    return out


def _finite(values):
    return [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]


def summarize(runs):
    """Per metric, mean / min / max over seeds.

    Args:
        runs: ``{seed: {task: {metric: value}}}``.
    Returns:
        ``{"box AP": {"mean", "min", "max", "n", "values"}, ...}`` for every metric of METRICS present
        (NaN, e.g. no detection at all, is left out of mean and range; ``n`` counts the others).
    """
    out = {}
    for task, metric in METRICS:
        values = [r.get(task, {}).get(metric) for _, r in sorted(runs.items())]
        if all(v is None for v in values):
            continue
        ok = _finite(values)
        out[f"{LABELS[task]} {metric}"] = {
            "mean": sum(ok) / len(ok) if ok else float("nan"), "min": min(ok) if ok else float("nan"),
            "max": max(ok) if ok else float("nan"), "n": len(ok), "values": values,
        }
    return out


def _cell(s):
    if not s["n"]:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def paired_gains(runs, baseline_runs, task="bbox", metric="AP"):
    """A model's metric minus the baseline's at the same fine-tuning seed, for every seed both finished.

    The fine-tuning seed fixes the new layers' initialisation and the image order, which move a small
    benchmark's AP by as much as pretraining does; the difference at one seed cancels that share.

    Args:
        runs, baseline_runs: ``{seed: {task: {metric: value}}}``.
    Returns:
        ``{seed: difference}`` in seed order; a seed missing or NaN on either side is left out.
    """
    out = {}
    for seed in sorted(runs):
        a = runs[seed].get(task, {}).get(metric)
        b = baseline_runs.get(seed, {}).get(task, {}).get(metric)
        if _finite([a]) and _finite([b]):
            out[seed] = a - b
    return out


def paired_cell(gains):
    """``paired_gains`` as one table cell: mean, then each seed's difference, and how many are above 0,
    e.g. ``+1.18 (+2.21, +0.58, +0.76; 3 of 3 above)``."""
    if not gains:
        return ""
    values = list(gains.values())
    seeds = ", ".join(f"{v:+.2f}" for v in values)
    return f"{sum(values) / len(values):+.2f} ({seeds}; {sum(v > 0 for v in values)} of {len(values)} above)"


def markdown_table(rows, title=None):
    """Rows ``[(name, num_seeds, summary)]`` -> Markdown: 'mean (min–max)' per metric column."""
    columns = [f"{LABELS[t]} {m}" for t, m in METRICS if any(f"{LABELS[t]} {m}" in s for _, _, s in rows)]
    lines = [title, ""] if title else []
    lines.append("| model | seeds | " + " | ".join(columns) + " |")
    lines.append("|---|---:|" + "---:|" * len(columns))
    for name, seeds, summary in rows:
        cells = [_cell(summary[c]) if c in summary else "" for c in columns]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "mean (min–max) over fine-tuning seeds; COCO AP in percent."]
    return "\n".join(lines) + "\n"


def plot_summary(rows, path, title=None, metrics=("box AP", "mask AP")):
    """Bar chart: mean per model and metric, error bars spanning the seed range, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in metrics if any(m in s for _, _, s in rows)]
    x = np.arange(len(rows))
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.6), dpi=120)
    for j, metric in enumerate(metrics):
        means, lo, hi, xs = [], [], [], x - 0.4 + width * (j + 0.5)
        for k, (_, _, s) in enumerate(rows):
            st = s.get(metric, {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "values": []})
            m = st["mean"] if st.get("n") else 0.0
            means.append(m)
            lo.append(m - st["min"] if st.get("n") else 0.0)
            hi.append(st["max"] - m if st.get("n") else 0.0)
            seeds = _finite(st["values"])
            ax.plot([xs[k]] * len(seeds), seeds, "k.", ms=4, zorder=3)
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=metric, zorder=2)
    ax.set_xticks(x)
    ax.set_xticklabels([name for name, _, _ in rows], rotation=20 if len(rows) > 4 else 0)
    ax.set_ylabel("AP (%)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scaling_points(models, recipe, budgets, final_budget, metric="box AP"):
    """The scaling curve of one pretraining recipe from a transfer benchmark's ``models`` (its JSON).

    Args:
        models: ``transfer.json``'s ``"models"``: entries with ``"name"`` and ``"summary"``.
        recipe: name of the recipe's final checkpoint; its budget-``B`` checkpoints are named
            ``<recipe>_b<B>`` (:func:`budget_model_name`), random initialisation ``random``.
        budgets: the intermediate budgets (pretraining steps); ``final_budget``: the recipe's MAX_ITER.
    Returns:
        ``[(budget, summary of metric or None)]`` for 0 (random init), each budget and the final one.
    """
    by_name = {m["name"]: m.get("summary", {}).get(metric) for m in models}
    return [(b, by_name.get(n)) for b, n in scaling_names(recipe, budgets, final_budget)]


def scaling_names(recipe, budgets, final_budget):
    """``[(steps, row name)]`` of a recipe's scaling curve: 0 is ``random``, each budget's checkpoint
    ``<recipe>_b<B>``, the final checkpoint the recipe's own name."""
    return [(0, "random")] + [(b, budget_model_name(recipe, b)) for b in budgets] + [(final_budget, recipe)]


def budget_model_name(recipe, budget):
    """Row name of a recipe's checkpoint after ``budget`` pretraining steps, e.g. ``mocov2_b500``."""
    return f"{recipe}_b{budget}"


def scaling_table(curves, metric="box AP"):
    """Markdown: one row per budget, one column per recipe, 'mean (min–max)' over fine-tuning seeds.
    ``curves``: ``{recipe: scaling_points(...)}``."""
    budgets = sorted({b for points in curves.values() for b, _ in points})
    lines = ["| pretraining steps | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for b in budgets:
        cells = []
        for points in curves.values():
            s = dict(points).get(b)
            cells.append(_cell(s) + ("" if not s or s["n"] == 0 else f" [{s['n']}]") if s else "")
        lines.append(f"| {'0 (random init)' if b == 0 else b} | " + " | ".join(cells) + " |")
    lines += ["", f"{metric}: mean (min–max) over fine-tuning seeds [number of seeds]; COCO AP in percent."]
    return "\n".join(lines) + "\n"


def plot_scaling(curves, path, metric="box AP", title=None, paired=None):
    """Line chart of ``scaling_table``'s numbers: mean against pretraining steps per recipe, the seed
    range as a band, every seed as a dot. ``paired`` (``{recipe: [(steps, paired_gains(...))]}``) adds a
    second panel: the difference to random init at the same fine-tuning seed, 0 at 0 steps by definition,
    with the zero line that marks where pretraining overtakes random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(10.4 if paired else 5.6, 3.6), dpi=120, squeeze=False)
    ax, pax, colors = axes[0][0], axes[0][-1], {}
    for recipe, points in curves.items():
        pts = [(b, s) for b, s in points if s and s["n"]]
        if not pts:
            continue
        xs = [b for b, _ in pts]
        line, = ax.plot(xs, [s["mean"] for _, s in pts], "o-", label=recipe, zorder=3)
        colors[recipe] = line.get_color()
        ax.fill_between(xs, [s["min"] for _, s in pts], [s["max"] for _, s in pts], color=line.get_color(), alpha=0.15)
        for b, s in pts:
            seeds = _finite(s["values"])
            ax.plot([b] * len(seeds), seeds, ".", color=line.get_color(), ms=3, zorder=2)
    ax.set_ylabel(f"{metric} (%)")
    if title:
        ax.set_title(title, fontsize=9)
    for recipe, points in (paired or {}).items():
        pts = [(0, [0.0])] + [(b, list(g.values())) for b, g in points if b and g]
        if len(pts) < 2:
            continue
        line, = pax.plot([b for b, _ in pts], [sum(v) / len(v) for _, v in pts], "o-", color=colors.get(recipe), label=recipe,
                         zorder=3)
        pax.fill_between([b for b, _ in pts], [min(v) for _, v in pts], [max(v) for _, v in pts], color=line.get_color(), alpha=0.15)
        for b, v in pts[1:]:
            pax.plot([b] * len(v), v, ".", color=line.get_color(), ms=3, zorder=2)
    if paired:
        pax.axhline(0.0, color="k", lw=0.8)
        pax.set_ylabel(f"{metric} minus random init, same seed")
        pax.set_title("paired with random init", fontsize=9)
    for a in axes[0]:
        a.set_xlabel("pretraining steps (0 = random init)")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

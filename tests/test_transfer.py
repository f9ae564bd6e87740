"""tools/transfer.py: the transfer benchmark on instant-test configs (1-iteration runs), its
reuse/resume behaviour and its bad-input messages; regionssl.transfer's summaries."""
import importlib.util
import json
import math
import os
import threading

import pytest

from regionssl import transfer

from regionssl_workbench import tiny_datasets as tiny
from conftest import HANG_TIMEOUT, ROOT as REPO

FINETUNE = os.path.join(REPO, "configs", "quick_schedules", "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml")
PRETRAIN = os.path.join(REPO, "configs", "quick_schedules", "mocov2_instant_test.yaml")
# one iteration each, small evaluation: the test checks the plumbing, not the numbers
FT_OPTS = ["SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0", "TEST.DETECTIONS_PER_IMAGE", "10",
           "MODEL.RPN.POST_NMS_TOPK_TEST", "20"]
PT_OPTS = ["SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "100"]


def _tool():
    spec = importlib.util.spec_from_file_location("transfer_tool", os.path.join(REPO, "tools", "transfer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _argv(output, models, seeds=("0",), ft_opts=FT_OPTS, finetune=FINETUNE):
    return (["--finetune-config", finetune, "--output", str(output), "--seeds", *seeds, "--models", *models,
             "--pretrain-opts", *PT_OPTS, "--finetune-opts", *ft_opts,
             "--train-net", os.path.join(REPO, "tools", "train_net_tiny.py")])  # registers the tiny sets


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One benchmark: random init and a pretraining config (pretrained by the tool), seed 0."""
    root = str(tmp_path_factory.getbasetemp() / "datasets" / "regionssl_tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("REGIONSSL_DATASETS", root)  # the train_net_tiny.py subprocesses read the same tiny set
    tiny.ensure_tiny_datasets(root)
    tiny.register_tiny_datasets(force=True)
    out = tmp_path_factory.mktemp("transfer")
    tool = _tool()
    result = tool.main(_argv(out, ["random", f"moco={PRETRAIN}"]))
    yield tool, out, result
    mp.undo()
    tiny.register_tiny_datasets(force=True)


def _mtimes(out):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(out) for f in files if not f.startswith("transfer.")}


@pytest.mark.slow
def test_outputs_have_one_row_per_model(bench):
    tool, out, result = bench
    assert result["done"]["pretrained"] == ["moco"]
    assert result["done"]["finetuned"] == [("random", 0), ("moco", 0)]
    assert os.path.isfile(out / "pretrain" / "moco" / "model_final.pth")
    with open(out / "transfer.json") as f:
        data = json.load(f)
    assert [m["name"] for m in data["models"]] == ["random", "moco"]
    assert data["models"][0]["weights"] == "" and data["models"][0]["weights_sha1"] is None
    assert data["models"][1]["weights"] == str(out / "pretrain" / "moco" / "model_final.pth")
    for m in data["models"]:
        assert list(m["runs"]) == ["0"]
        run = m["runs"]["0"]
        assert run["iteration"] == 1 and run["seed"] == 0  # evaluated after its one iteration
        assert set(run["results"]) == {"bbox", "segm"}
        assert set(m["summary"]) == {"box AP", "box AP50", "box AP75", "mask AP", "mask AP50", "mask AP75"}
        s = m["summary"]["box AP"]
        ap = run["results"]["bbox"]["AP"]
        assert s["values"] == [ap] and (math.isnan(ap) or s["mean"] == s["min"] == s["max"] == ap)
    with open(out / "transfer.md") as f:
        table = f.read()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | seeds | box AP | box AP50 | box AP75 | mask AP |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["random", "moco"]
    with open(out / "transfer.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the fine-tune kept its final checkpoint only; every run directory knows its identity
    seed0 = out / "finetune" / "moco" / "seed0"
    assert sorted(f for f in os.listdir(seed0) if f.endswith(".pth")) == ["model_final.pth"]
    ident = json.loads((seed0 / transfer.RUN_FILE).read_text())
    assert ident["weights_sha1"] == transfer.file_sha1(str(out / "pretrain" / "moco" / "model_final.pth"))


@pytest.mark.slow
def test_rerun_reuses_every_run(bench):
    tool, out, _ = bench
    before = _mtimes(out)
    result = tool.main(_argv(out, ["random", f"moco={PRETRAIN}"]))
    assert result["done"] == {"pretrained": [], "finetuned": [], "reused": [("random", 0), ("moco", 0)]}
    assert _mtimes(out) == before  # nothing trained or rewritten


@pytest.mark.slow
def test_interrupted_run_resumes_without_retraining(bench):
    """A run whose metrics file is missing (e.g. stopped during evaluation) resumes from its last
    checkpoint with Detectron2's --resume: evaluated again, not trained again."""
    tool, out, _ = bench
    run_dir = out / "finetune" / "random" / "seed0"
    final = run_dir / "model_final.pth"
    stamp = os.path.getmtime(final)
    os.remove(run_dir / transfer.METRICS_FILE)
    result = tool.main(_argv(out, ["random"]))
    assert result["done"]["finetuned"] == [("random", 0)]
    assert os.path.getmtime(final) == stamp  # not trained again
    assert set(json.loads((run_dir / transfer.METRICS_FILE).read_text())["results"]) == {"bbox", "segm"}


@pytest.mark.slow
def test_report_only_tabulates_finished_runs_and_starts_nothing(bench):
    """--report-only on a benchmark with seed 0 done and seed 1 not started: one row per model with
    the seeds it has, nothing trained, pretrained or rewritten but the transfer.* outputs."""
    tool, out, _ = bench
    before = _mtimes(out)
    result = tool.main(_argv(out, ["random", f"moco={PRETRAIN}"], seeds=("0", "1")) + ["--report-only"])
    assert result["done"] == {"pretrained": [], "finetuned": [], "reused": [("random", 0), ("moco", 0)]}
    assert _mtimes(out) == before and not os.path.exists(out / "finetune" / "random" / "seed1")
    table = (out / "transfer.md").read_text()
    assert table.startswith("Fine-tuning protocol") and "seeds 0 1 (finished runs only)" in table.splitlines()[0]
    assert [r.split("|")[1:3] for r in table.splitlines() if r.startswith("| random") or r.startswith("| moco")] == [
        [" random ", " 1 "], [" moco ", " 1 "]]
    tool.main(_argv(out, ["random", f"moco={PRETRAIN}"]))  # the outputs of the full benchmark again


@pytest.mark.slow
def test_jobs_run_side_by_side_with_threads_split(bench, tmp_path, monkeypatch):
    """--jobs 2: the two seeds' fine-tunes are in flight at once (each waits at a barrier for the
    other before it runs), each with cores // 2 torch threads; the table is the same as one run
    after the other would write (same rows, every seed)."""
    tool, _, _ = bench
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    both_started = threading.Barrier(2, timeout=HANG_TIMEOUT)  # broken (an error) if the runs were sequential
    threads, original = [], tool.run_train_net

    def together(*args, **kwargs):
        both_started.wait()
        threads.append(args[5] if len(args) > 5 else kwargs.get("threads"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tool, "run_train_net", together)
    result = tool.main(_argv(tmp_path, ["random"], seeds=("0", "1")) + ["--jobs", "2"])
    assert result["done"]["finetuned"] == [("random", 0), ("random", 1)]
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2
    (model,) = json.loads((tmp_path / "transfer.json").read_text())["models"]
    assert list(model["runs"]) == ["0", "1"] and len(model["summary"]["box AP"]["values"]) == 2
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        tool.main(_argv(tmp_path, ["random"]) + ["--jobs", "0"])


@pytest.mark.slow
def test_run_directory_of_another_config_stops_and_keeps_it(bench, capsys):
    tool, out, _ = bench
    before = _mtimes(out)
    with pytest.raises(SystemExit) as e:
        tool.main(_argv(out, ["random"], ft_opts=FT_OPTS[:1] + ["2"] + FT_OPTS[2:]))
    msg = str(e.value)
    assert str(out / "finetune" / "random" / "seed0") in msg and "SOLVER.MAX_ITER: 1 -> 2" in msg
    assert _mtimes(out) == before


def test_run_identity_compares_config_and_weights(tmp_path):
    ident = transfer.config_identity("SOLVER:\n  MAX_ITER: 5\n", "abc")
    assert transfer.check_run_identity(str(tmp_path / "none"), ident) == "new"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert transfer.check_run_identity(str(run_dir), ident) == "new"  # empty
    (run_dir / "log.txt").write_text("x")
    with pytest.raises(transfer.TransferError, match="not made by tools/transfer.py"):
        transfer.check_run_identity(str(run_dir), ident)
    (run_dir / transfer.RUN_FILE).write_text(json.dumps(ident))
    assert transfer.check_run_identity(str(run_dir), ident) == "same"
    other = transfer.config_identity("SOLVER:\n  MAX_ITER: 5\n", "def")
    assert transfer.check_run_identity(str(run_dir), other, check_weights=False) == "same"
    with pytest.raises(transfer.TransferError, match="different weights"):
        transfer.check_run_identity(str(run_dir), other)
    with pytest.raises(transfer.TransferError, match="MAX_ITER: 5 -> 6"):
        transfer.check_run_identity(str(run_dir), transfer.config_identity("SOLVER:\n  MAX_ITER: 6\n", "abc"))
    # a key the code gained since (at its default) does not invalidate the run
    newer = transfer.config_identity("SOLVER:\n  MAX_ITER: 5\n  NEW_KEY: 1\n", "abc")
    assert transfer.check_run_identity(str(run_dir), newer) == "same"
    # a benchmark directory copied elsewhere: only OUTPUT_DIR differs, the run is reused
    (run_dir / transfer.RUN_FILE).write_text(json.dumps(transfer.config_identity("OUTPUT_DIR: /a/run\nSEED: 0\n", "abc")))
    assert transfer.check_run_identity(str(run_dir), transfer.config_identity("OUTPUT_DIR: /b/run\nSEED: 0\n", "abc")) == "same"
    with pytest.raises(transfer.TransferError, match="SEED: 0 -> 1"):
        transfer.check_run_identity(str(run_dir), transfer.config_identity("OUTPUT_DIR: /b/run\nSEED: 1\n", "abc"))


def test_missing_checkpoint_stops_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="nowhere/model_final.pth"):
        _tool().main(_argv(tmp_path / "out", ["random", str(tmp_path / "nowhere" / "model_final.pth")]))
    assert not os.path.exists(tmp_path / "out")


def test_pretraining_config_as_protocol_stops_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="mocov2_instant_test.yaml.*not a fine-tuning config"):
        _tool().main(_argv(tmp_path / "out", ["random"], finetune=PRETRAIN))
    with pytest.raises(SystemExit, match="finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml.*not a pretraining config"):
        _tool().main(_argv(tmp_path / "out", [f"x={FINETUNE}"]))
    assert not os.path.exists(tmp_path / "out")


def test_model_names():
    assert transfer.parse_model_spec("random").name == "random"
    assert transfer.parse_model_spec(PRETRAIN).name == "mocov2_instant_test"
    assert transfer.parse_model_spec("mine=" + PRETRAIN).name == "mine"
    with pytest.raises(transfer.TransferError, match="does not exist"):
        transfer.parse_model_spec("configs/nope.yaml")


def test_summary_is_mean_and_range_over_seeds():
    runs = {0: {"bbox": {"AP": 10.0, "AP50": 20.0}}, 1: {"bbox": {"AP": 14.0, "AP50": float("nan")}},
            2: {"bbox": {"AP": 12.0, "AP50": 30.0}}}
    s = transfer.summarize(runs)
    assert s["box AP"] == {"mean": 12.0, "min": 10.0, "max": 14.0, "n": 3, "values": [10.0, 14.0, 12.0]}
    assert s["box AP50"]["mean"] == 25.0 and s["box AP50"]["n"] == 2  # NaN (no detection) left out
    assert "mask AP" not in s
    table = transfer.markdown_table([("random", 3, s)])
    assert "| random | 3 | 12.0 (10.0–14.0) | 25.0 (20.0–30.0) |" in table


def test_timings_are_read_from_the_detectron2_log():
    log = ("[d2.engine.hooks]: Overall training speed: 248 iterations in 0:10:20 (2.5000 s / it)\n"
           "[d2.evaluation.evaluator]: Total inference time: 0:00:40.500000 (0.405000 s / iter per device, on 1 devices)\n")
    assert transfer.read_timings(log) == {"train_iterations": 248, "train_seconds": 620, "seconds_per_iteration": 2.5,
                                          "inference_seconds": 40.5, "seconds_per_image": 0.405}


def test_demo_summary_prints_pretrained_beside_random(tmp_path, capsys):
    """tools/summarize_run.py --transfer (the end of `make demo`): both rows and the difference."""
    spec = importlib.util.spec_from_file_location("summarize_run", os.path.join(REPO, "tools", "summarize_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "metrics.json").write_text(json.dumps({"iteration": 29, "loss_contrast_p2": 5.0}) + "\n")

    def run(box, mask):
        return {"seed": 0, "results": {"bbox": {"AP": box, "AP50": 2 * box, "AP75": box / 2},
                                       "segm": {"AP": mask, "AP50": 2 * mask, "AP75": mask / 2}}}

    data = {"models": [{"name": "insloc_fpn", "kind": "checkpoint", "runs": {"0": run(22.5, 20.25)}},
                       {"name": "random", "kind": "random", "runs": {"0": run(5.0, 4.0)}}]}
    (tmp_path / "transfer.json").write_text(json.dumps(data))
    assert mod.main(["--pretrain", str(pre), "--transfer", str(tmp_path / "transfer.json")]) == 0
    out = " ".join(capsys.readouterr().out.split(" "))
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "insloc_fpn (seed 0) 22.50 (45.0, 11.2) 20.25 (40.5, 10.1)" in lines
    assert "random init (seed 0) 5.00 (10.0, 2.5) 4.00 (8.0, 2.0)" in lines
    assert "AP difference: +17.50 box AP, +16.25 mask AP (insloc_fpn vs random init, one seed)" in out
    assert "pretraining bought" not in out  # no probe given: nothing is claimed for the pretraining
    assert "queue is" not in out  # no queue logged


def test_demo_summary_states_the_probe_gain(tmp_path, capsys):
    """With tools/probe.py's JSON, the summary states what the pretraining bought on the probe: region
    top-1 of both columns (means over seeds) and the paired gain, counting the seeds above random init."""
    spec = importlib.util.spec_from_file_location("summarize_run", os.path.join(REPO, "tools", "summarize_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "metrics.json").write_text(json.dumps({"iteration": 29, "loss_contrast_p2": 5.0}) + "\n")

    def metrics(top1):
        return {"top1": top1, "num_queries": 512, "chance": 1 / 64, "image_top1": 0.5}

    probe = {"dataset": "regionssl_demo_images_heldout", "seeds": [0, 1, 2], "results": {
        "checkpoint": {"0": metrics(0.25), "1": metrics(0.20), "2": metrics(0.30)},
        "random init": {"0": metrics(0.20), "1": metrics(0.21), "2": metrics(0.24)}}}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    assert mod.main(["--pretrain", str(pre), "--probe", str(tmp_path / "probe.json"), "--finetune", str(pre)]) == 1
    out = capsys.readouterr().out
    assert ("probe       : region top-1 on held-out regionssl_demo_images_heldout (512 queries per seed, chance 0.016): "
            "pretrained 0.250, random init 0.217\n") in out
    assert ("pretraining bought +0.033 region top-1 (paired: same views, seeds 0, 1, 2; 2 of 3 seeds above random "
            "init)\n") in out
    del probe["results"]["random init"]
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    with pytest.raises(ValueError, match="probe.json: needs the checkpoint and random-init columns"):
        mod.main(["--pretrain", str(pre), "--probe", str(tmp_path / "probe.json"), "--finetune", str(pre)])


def test_demo_summary_explains_a_filling_queue(tmp_path, capsys):
    """The demo's 30 steps end with the queue half full (4 x 30 keys of 256): its rising loss is said
    to be expected, naming the fill; a full queue gets no such line."""
    spec = importlib.util.spec_from_file_location("summarize_run", os.path.join(REPO, "tools", "summarize_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = {"models": [{"name": "random", "kind": "random", "runs": {"0": {"seed": 0, "results": {
        "bbox": {"AP": 1.0}, "segm": {"AP": 1.0}}}}}]}
    (tmp_path / "transfer.json").write_text(json.dumps(data))
    for fill, expected in ((0.46875, "the key queue is 47% full"), (1.0, None)):
        pre = tmp_path / f"pretrain{fill}"
        pre.mkdir()
        (pre / "metrics.json").write_text(json.dumps({
            "iteration": 29, "loss_contrast_p2": 5.0, "regionssl/acc_p2": 0.0, "regionssl/queue_fill_p2": fill,
            "regionssl/queue_fill_p3": 1.0}) + "\n")
        mod.main(["--pretrain", str(pre), "--transfer", str(tmp_path / "transfer.json")])
        out = capsys.readouterr().out
        if expected:
            assert expected in out and "the loss may rise" in out
        else:
            assert "queue is" not in out


def test_checkpoint_digest_read_once_and_again_after_a_rewrite(tmp_path, monkeypatch):
    """The benchmark asks for a checkpoint's digest in its plan and in its run: the file is read once;
    a file rewritten in between (new modification time) is read again and gets its new digest."""
    import builtins
    import hashlib

    path = tmp_path / "model_final.pth"
    path.write_bytes(b"weights v1")
    reads = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    first = transfer.file_sha1(str(path))
    assert transfer.file_sha1(str(path)) == first == hashlib.sha1(b"weights v1").hexdigest()
    assert len(reads) == 1
    path.write_bytes(b"weights v2")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a rewrite within one clock tick
    assert transfer.file_sha1(str(path)) == hashlib.sha1(b"weights v2").hexdigest()
    assert len(reads) == 2

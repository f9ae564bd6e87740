"""Experiment tracking: Weights & Biases and MLflow as Detectron2 ``EventWriter``s.

Enabled by ``TEST.REGIONSSL.WANDB.ENABLED`` / ``TEST.REGIONSSL.MLFLOW.ENABLED`` (off by default);
``wandb`` / ``mlflow`` are imported only then. The trainers add these writers to Detectron2's
(console, ``metrics.json``, TensorBoard) in ``build_writers``, so they run on the main process,
every 20 iterations and at the end, and see every scalar of the ``EventStorage``: losses, lr,
``regionssl/*`` diagnostics, ``probe/*``, and the evaluation results (``bbox/AP``, ...), each
logged once at the iteration it was put.

The run id is kept in ``OUTPUT_DIR`` (``wandb_run_id``, ``mlflow_run_id``): a resumed run, e.g. a
Slurm job requeued by ``tools/slurm_launch.py``, continues the same tracked run.
"""
import logging
import os
import re
import time
import uuid

from detectron2.utils.events import EventWriter, get_event_storage

__all__ = ["WandbWriter", "MLflowWriter", "build_tracking_writers"]

logger = logging.getLogger(__name__)


def _run_name(cfg, name):
    return name or os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)) or "regionssl"


def _saved_run_id(cfg, filename, make):
    """Run id stored in OUTPUT_DIR/filename, or ``make()`` stored there."""
    path = os.path.join(cfg.OUTPUT_DIR, filename)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id, True
    run_id = make()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write(run_id)
    return run_id, False


class _TrackingWriter(EventWriter):
    """Collects the scalars put since the last write, grouped by iteration (as TensorboardXWriter)."""

    def __init__(self, window_size=20):
        self._window_size = window_size
        self._last_write = -1

    def new_scalars(self):
        """{iteration: {name: value}} of the scalars not written yet."""
        storage = get_event_storage()
        out, last = {}, self._last_write
        for name, (value, it) in storage.latest_with_smoothing_hint(self._window_size).items():
            if it > self._last_write:
                out.setdefault(it, {})[name] = float(value)
                last = max(last, it)
        self._last_write = last
        return out


class WandbWriter(_TrackingWriter):
    """Logs scalars to a W&B run (``step`` = iteration); the config is the run's config."""

    def __init__(self, cfg, window_size=20):
        super().__init__(window_size)
        import wandb
        import yaml

        w = cfg.TEST.REGIONSSL.WANDB
        run_id, resumed = _saved_run_id(cfg, "wandb_run_id", lambda: uuid.uuid4().hex[:12])
        self._run = wandb.init(
            project=w.PROJECT, entity=w.ENTITY or None, name=_run_name(cfg, w.RUN_NAME), id=run_id,
            resume="allow", mode=w.MODE, dir=cfg.OUTPUT_DIR, config=yaml.safe_load(cfg.dump()),
        )
        logger.info(f"W&B run {run_id} ({'resumed' if resumed else 'new'}, mode {w.MODE})")

    def write(self):
        for it, scalars in sorted(self.new_scalars().items()):
            self._run.log(scalars, step=it)

    def close(self):
        self._run.finish()


class MLflowWriter(_TrackingWriter):
    """Logs scalars as MLflow metrics (``step`` = iteration); the config is a ``config.yaml`` artifact."""

    _INVALID = re.compile(r"[^\w\-. /]")  # MLflow metric names: alphanumerics, _ - . space /

    def __init__(self, cfg, window_size=20):
        super().__init__(window_size)
        from mlflow.tracking import MlflowClient

        m = cfg.TEST.REGIONSSL.MLFLOW
        self._client = MlflowClient(tracking_uri=m.TRACKING_URI or None)
        experiment = self._client.get_experiment_by_name(m.EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(m.EXPERIMENT)

        def new_run():
            return self._client.create_run(experiment_id, run_name=_run_name(cfg, m.RUN_NAME)).info.run_id

        self._run_id, resumed = _saved_run_id(cfg, "mlflow_run_id", new_run)
        if not resumed:
            self._client.log_text(self._run_id, cfg.dump(), "config.yaml")
            for key in ("MODEL.META_ARCHITECTURE", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.MAX_ITER"):
                node = cfg
                for part in key.split("."):
                    node = node[part]
                self._client.log_param(self._run_id, key, node)
        else:
            self._client.update_run(self._run_id, status="RUNNING")
        logger.info(f"MLflow run {self._run_id} ({'resumed' if resumed else 'new'}) at {self._client.tracking_uri}")

    def write(self):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self._INVALID.sub("_", name), value, now, it)
                   for it, scalars in sorted(self.new_scalars().items()) for name, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self._client.log_batch(self._run_id, metrics=metrics[start:start + 1000])

    def close(self):
        self._client.set_terminated(self._run_id)


def build_tracking_writers(cfg):
    """The enabled tracking writers (none by default)."""
    writers = []
    if cfg.TEST.REGIONSSL.WANDB.ENABLED:
        writers.append(WandbWriter(cfg))
    if cfg.TEST.REGIONSSL.MLFLOW.ENABLED:
        writers.append(MLflowWriter(cfg))
    return writers

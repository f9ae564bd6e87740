"""bench/mapper_breakdown.py's accounting: each stage gets its exclusive time, every wrapper goes away."""
from detectron2.data import transforms as T

from regionssl.data import image_io, mapper as mapper_module
from regionssl_workbench.scripts import load_script


def _breakdown_module():
    return load_script("bench/mapper_breakdown.py")


class _Base:
    def inner(self):
        self.clock[0] += 2.0


class _Work(_Base):
    """Methods that advance a fake clock by fixed amounts, one calling the other (one inherited)."""

    def __init__(self, clock):
        self.clock = clock

    def outer(self):
        self.clock[0] += 1.0
        self.inner()
        self.inner()
        self.clock[0] += 4.0


def test_stage_timer_counts_exclusive_time_and_restores(monkeypatch):
    mb = _breakdown_module()
    clock = [0.0]
    monkeypatch.setattr(mb.time, "perf_counter", lambda: clock[0])
    original_outer, original_inner = _Work.outer, _Work.inner
    with mb.StageTimer() as timer:
        timer.wrap(_Work, "outer", "outer")
        timer.wrap(_Work, "inner", lambda enclosing: "inner of " + enclosing[-1] if enclosing else "inner alone")
        work = _Work(clock)
        work.outer()
        work.inner()
    assert timer.seconds == {"outer": 5.0, "inner of outer": 4.0, "inner alone": 2.0}
    assert timer.calls == {"outer": 1, "inner of outer": 2, "inner alone": 1}
    assert _Work.outer is original_outer and _Work.inner is original_inner
    assert "inner" not in vars(_Work)  # the inherited method is uncovered again, not copied down


def test_insloc_breakdown_names_both_decodes_and_leaves_the_mapper_unwrapped(tmp_path):
    mb = _breakdown_module()
    before = (mapper_module.RegionSSLDatasetMapper.__call__, image_io.ImageFile.decode, T.AugmentationList.__call__,
              mapper_module.open_image_or_none, image_io.open_image_or_none, mapper_module.anchor_jitter)
    files = mb.throughput.make_photos(str(tmp_path), (320, 240), limit=3)
    ms, stages = mb.breakdown("CopyPaste + PastedBox + jitter (InsLoc)", files, samples=4)
    assert {"JPEG decode, sample", "JPEG decode, backgrounds", "resize", "anchor jitter",
            "file read + header", "rest (composite, flips, transforms, tensors)"} <= set(stages)
    # three decodes and four resizes per sample: the foreground once, a background per view
    assert stages["JPEG decode, sample"][1] == 1 and stages["JPEG decode, backgrounds"][1] == 2
    assert stages["resize"][1] == 4 and stages["file read + header"][1] == 3
    assert ms > 0 and all(t >= 0 for t, _ in stages.values())
    after = (mapper_module.RegionSSLDatasetMapper.__call__, image_io.ImageFile.decode, T.AugmentationList.__call__,
             mapper_module.open_image_or_none, image_io.open_image_or_none, mapper_module.anchor_jitter)
    assert after == before

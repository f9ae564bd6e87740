"""Images the mapper meets in real folders: each maps correctly or is skipped with a warning naming
the file; the real Detectron2 train loader keeps yielding full batches over a mixed folder; a
folder without images fails once, clearly."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from regionssl.data import RegionSSLDatasetMapper, build_pretrain_train_loader, get_pretrain_dataset_dicts
from regionssl.data.image_io import MIN_IMAGE_SIDE, read_rgb_or_none
from regionssl.engine import get_regionssl_cfg
from regionssl_workbench.scripts import load_script

H, W = 240, 320


def _rgb():
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx * 255 // (W - 1), yy * 255 // (H - 1), (xx + yy) % 256], -1).astype(np.uint8)


def write_files(folder):
    """name -> expectation: "map" (mapped, valid output) or "skip" (None + warning)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _rgb()
    rng = np.random.RandomState(0)
    Image.fromarray(rgb).save(folder / "good.jpg", quality=90)
    (folder / "corrupt.jpg").write_bytes(rng.bytes(5000))
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.jpg", quality=90)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(rgb[:15, :20]).save(folder / "small.png")  # smaller than any crop size
    Image.fromarray(np.repeat(rgb[:1, :1], 2000, axis=1)).save(folder / "wide.png")  # 2000 x 1
    Image.fromarray(np.repeat(rgb[:1, :1], 2000, axis=0)).save(folder / "tall.png")  # 1 x 2000
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(folder / "exif6.jpg", exif=exif, quality=95)
    (folder / "fake.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("not an image either, and not listed")
    return {
        "good.jpg": "map", "corrupt.jpg": "skip", "truncated.jpg": "skip", "gray.png": "map",
        "gray.jpg": "map", "cmyk.jpg": "map", "rgba.png": "map", "palette.png": "map", "gray16.png": "map",
        "small.png": "map", "wide.png": "skip", "tall.png": "skip", "exif6.jpg": "map", "fake.jpg": "skip",
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return root, write_files(root)


def _opts(generator, sampler, *extra):
    return ["INPUT.REGIONSSL.VIEW_GENERATOR", generator, "INPUT.REGIONSSL.REGION_SAMPLER", sampler,
            "INPUT.REGIONSSL.CROP_SIZE", 64, "INPUT.REGIONSSL.INTERSECTION.MIN_SIZE", 8,
            "INPUT.REGIONSSL.COPY_PASTE.FG_SIZE", [24, 60], *extra]


def check_output(out):
    assert isinstance(out, dict) and len(out["views"]) == len(out["boxes"]) >= 2
    r = len(out["valid"])
    assert r >= 1 and out["valid"].any()
    for view, boxes in zip(out["views"], out["boxes"]):
        assert view.dtype == torch.uint8 and view.shape[0] == 3
        assert boxes.shape == (r, 4) and torch.isfinite(boxes).all()
        h, w = view.shape[1:]
        b = boxes[out["valid"]]
        assert (b[:, :2] >= -1e-3).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert (b[:, 2:] > b[:, :2]).all()


@pytest.mark.parametrize(
    "generator,sampler",
    [("TwoCrops", "IntersectionBoxes"), ("TwoCropsSharedFlip", "SlidingWindows"), ("CopyPaste", "PastedBox")],
)
def test_each_file_maps_or_is_skipped_with_warning(folder, generator, sampler, caplog):
    root, expected = folder
    opts = _opts(generator, sampler, "INPUT.REGIONSSL.WINDOWS.SIZES", [16], "INPUT.REGIONSSL.WINDOWS.STRIDES", [12])
    cfg = get_regionssl_cfg(None, opts)
    dicts = [{"file_name": str(root / n), "image_id": i} for i, n in enumerate(expected)]
    mapper = RegionSSLDatasetMapper(cfg, dataset_dicts=dicts)  # backgrounds drawn from the mixed folder too
    np.random.seed(0)
    for d in dicts:
        name = d["file_name"].rsplit("/", 1)[-1]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = mapper(d)
        if expected[name] == "skip":
            assert out is None, name
            assert any(d["file_name"] in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), name
        else:
            assert out is not None, name
            check_output(out)
            if name == "exif6.jpg":  # the mapper sees the displayed (rotated) geometry
                assert (out["height"], out["width"]) == (W, H)
            elif name == "small.png":
                assert (out["height"], out["width"]) == (15, 20)
            else:
                assert (out["height"], out["width"]) == (H, W)


def test_decoded_pixels_of_converted_modes(folder):
    root, _ = folder
    rgb = _rgb().astype(np.int32)
    gray = rgb[..., 0]

    def diff(name, ref):
        return np.abs(read_rgb_or_none(str(root / name)).astype(np.int32) - ref).mean()

    assert diff("gray.png", gray[..., None]) == 0
    assert diff("gray16.png", gray[..., None]) < 0.5  # scaled to 8 bits, not clipped to white
    assert diff("palette.png", rgb) < 8
    assert diff("rgba.png", rgb) == 0
    assert diff("cmyk.jpg", rgb) < 4
    # EXIF orientation 6: the stored image is shown rotated 90 degrees clockwise
    assert diff("exif6.jpg", np.rot90(rgb, k=-1)) < 4


def test_exif_rotated_jpeg_is_never_draft_decoded(tmp_path):
    """Draft decoding is skipped for EXIF-rotated JPEGs: the mapper's views show the rotated image."""
    big = np.repeat(np.repeat(_rgb(), 4, axis=0), 4, axis=1)  # 960 x 1280: drafts would apply
    im = Image.fromarray(big)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    from regionssl.data.image_io import open_image_or_none

    item = open_image_or_none(str(tmp_path / "rot.jpg"))
    assert (item.height, item.width) == (1280, 960) and item.max_decode_reduction(8) == 1
    assert open_image_or_none(str(tmp_path / "rot.jpg").replace("rot", "nope")) is None


@pytest.mark.parametrize(
    "generator,sampler,workers",
    [("TwoCrops", "IntersectionBoxes", 0), ("CopyPaste", "PastedBox", 0), ("TwoCrops", "WholeView", 2)],
)
def test_train_loader_over_mixed_folder_yields_full_batches(folder, generator, sampler, workers):
    root, _ = folder
    cfg = get_regionssl_cfg(None, _opts(generator, sampler))
    cfg.DATASETS.TRAIN = (f"folder:{root}",)
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = workers
    loader = iter(build_pretrain_train_loader(cfg))
    for _ in range(6):
        batch = next(loader)
        assert len(batch) == 4
        for out in batch:
            check_output(out)


def test_empty_missing_and_imageless_folders_fail_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("hi")
    for path, error in ((empty, ValueError), (text_only, ValueError), (tmp_path / "missing", FileNotFoundError)):
        with pytest.raises(error, match=str(path)):
            get_pretrain_dataset_dicts([f"folder:{path}"])
        cfg = get_regionssl_cfg(None, [])
        cfg.DATASETS.TRAIN = (f"folder:{path}",)
        with pytest.raises(error, match=str(path)):
            build_pretrain_train_loader(cfg)


def test_min_image_side_is_small():
    assert MIN_IMAGE_SIDE <= 8  # a 20x15 image is mapped, not skipped


# ----------------------------------------------------------------------------- skipped files: once, counted
def _folder_with_bad_files(root):
    root.mkdir(parents=True, exist_ok=True)
    rgb = _rgb()
    for i in range(3):
        Image.fromarray(np.roll(rgb, 40 * i, axis=1)).save(root / f"good{i}.jpg", quality=90)
    (root / "corrupt.jpg").write_bytes(np.random.RandomState(1).bytes(3000))
    data = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return [str(root / "corrupt.jpg"), str(root / "truncated.jpg")]


def test_unreadable_file_warns_once_over_epochs(tmp_path, caplog, monkeypatch):
    """The loader returns to the two bad files every epoch; each is warned about once."""
    from regionssl.data import mapper as mapper_module

    bad = _folder_with_bad_files(tmp_path / "imgs")
    opened = []
    real_open = mapper_module.open_image_or_none
    monkeypatch.setattr(mapper_module, "open_image_or_none", lambda f, *a: opened.append(f) or real_open(f, *a))
    cfg = get_regionssl_cfg(None, _opts("TwoCrops", "IntersectionBoxes"))
    cfg.DATASETS.TRAIN = (f"folder:{tmp_path / 'imgs'}",)
    cfg.SOLVER.IMS_PER_BATCH = 3
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = iter(build_pretrain_train_loader(cfg))
    with caplog.at_level(logging.WARNING):
        carried = [f for _ in range(10) for d in next(loader) for f in d["skipped_files"]]  # 30 samples ~ 6+ epochs
    for name in bad:
        assert opened.count(name) >= 3, "each bad file is requested in several epochs"
        assert sum(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1, name
    assert sorted(carried) == sorted(bad)  # each name travels once, in some mapped sample


def test_skipped_files_counted_over_workers_in_metrics_and_summary(tmp_path, caplog):
    """Two loader workers: the hook's ``regionssl/skipped_images`` counts distinct files over both
    (2, whichever worker met them, however often), the end of training logs it and writes the
    names, and tools/summarize_run.py prints it from metrics.json."""
    import contextlib
    import io
    import json
    import types

    from detectron2.utils.events import EventStorage

    from regionssl.engine.hooks import PretrainLoader, SkippedFilesHook
    summarize = load_script("tools/summarize_run.py").main

    bad = _folder_with_bad_files(tmp_path / "imgs")
    cfg = get_regionssl_cfg(None, _opts("TwoCrops", "WholeView"))
    cfg.DATASETS.TRAIN = (f"folder:{tmp_path / 'imgs'}",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 2
    collector = PretrainLoader(build_pretrain_train_loader(cfg))
    out = tmp_path / "pretrain"
    trainer = types.SimpleNamespace(data_loader=collector, iter=0, max_iter=12)
    hook = SkippedFilesHook(str(out))
    hook.trainer = trainer
    with EventStorage(0) as storage, caplog.at_level(logging.INFO):
        for it, batch in zip(range(trainer.max_iter), collector):  # 24 samples: each worker sees both bad files
            trainer.iter = storage.iter = it
            hook.after_step()
        hook.after_train()
        count = storage.latest()["regionssl/skipped_images"][0]
    assert count == 2 and collector.files == set(bad)
    assert (out / "skipped_images.txt").read_text().split() == sorted(bad)
    assert any("Skipped image files: 2 unreadable" in r.getMessage() for r in caplog.records)
    # the run summary reads the metric from metrics.json
    (out / "metrics.json").write_text(json.dumps({"iteration": 11, "loss_byol": 1.5, "regionssl/skipped_images": count}) + "\n")
    fine = tmp_path / "finetune"
    fine.mkdir()
    (fine / "metrics.json").write_text(json.dumps({"bbox/AP": 1.0, "segm/AP": 0.5}) + "\n")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert summarize(["--pretrain", str(out), "--finetune", str(fine)]) == 0
    assert f"skipped     : 2 unreadable image files (names: {out / 'skipped_images.txt'})" in buf.getvalue()


def test_loader_mapper_draws_backgrounds_from_the_serialised_records(folder):
    """CopyPaste's backgrounds come from the loader's records (one byte tensor the workers share),
    not from a Python list of every path copied into each worker."""
    from detectron2.data import DatasetFromList

    from regionssl.data.datasets import RecordField

    root, _ = folder
    cfg = get_regionssl_cfg(None, _opts("CopyPaste", "PastedBox"))
    cfg.DATASETS.TRAIN = (f"folder:{root}",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = build_pretrain_train_loader(cfg)
    names = loader.stream.mapper.view_generator.background_source.file_names
    assert isinstance(names, RecordField) and isinstance(names.records, DatasetFromList)
    assert [names[i] for i in range(len(names))] == [d["file_name"] for d in get_pretrain_dataset_dicts([f"folder:{root}"])]

"""Image listings at scale (regionssl/data/listing.py): the cached folder listing and its
invalidation, ``filelist:`` datasets, symlinked directories not followed."""
import json
import multiprocessing
import os

import pytest

from regionssl.data import listing
from regionssl.data.build import get_pretrain_dataset_dicts
from regionssl.data.datasets import list_image_files

PAST = 1_000_000_000 * 1_600_000_000  # 2020, in ns: every directory "settled" long before NOW
NOW = PAST + 1_000_000_000 * 3600


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")


def _settle(root):
    """Set every directory's modification time to PAST (as if the tree were written long ago)."""
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(PAST, PAST))


def _tree(root):
    for cls in ("n01", "n02"):
        for i in range(3):
            _touch(os.path.join(root, cls, f"{cls}_{i}.JPEG"))
    _touch(os.path.join(root, "n02", "notes.txt"))
    os.makedirs(os.path.join(root, "n03"))  # a class folder without images yet
    _settle(root)


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, root, dirs):
        self.calls += 1
        return list_image_files(root, dirs)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONSSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "listings"


def test_listing_is_cached_and_read_back(tmp_path, cache):
    root = str(tmp_path / "train")
    _tree(root)
    walk = _Counting()
    first = listing.cached_listing(root, walk, clock_ns=lambda: NOW)
    assert [os.path.relpath(f, root) for f in first] == [f"n01/n01_{i}.JPEG" for i in range(3)] + [
        f"n02/n02_{i}.JPEG" for i in range(3)]
    (written,) = [p for p in os.listdir(cache) if p.endswith(".txt")]
    with open(cache / written) as f:
        header = json.loads(f.readline())
        assert header["count"] == 6 and sorted(header["mtimes"]) == ["", "n01", "n02", "n03"]
        assert f.read().split() == [os.path.relpath(p, root) for p in first]  # relative paths
    assert listing.cached_listing(root, walk, clock_ns=lambda: NOW) == first
    assert walk.calls == 1


@pytest.mark.parametrize("change", ["add_in_class", "add_in_empty_class", "remove", "new_class", "rename_class"])
def test_any_change_of_the_tree_relists(tmp_path, cache, change):
    root = str(tmp_path / "train")
    _tree(root)
    walk = _Counting()
    before = listing.cached_listing(root, walk, clock_ns=lambda: NOW)
    if change == "add_in_class":
        _touch(os.path.join(root, "n01", "n01_9.JPEG"))
    elif change == "add_in_empty_class":
        _touch(os.path.join(root, "n03", "n03_0.JPEG"))
    elif change == "remove":
        os.remove(os.path.join(root, "n02", "n02_1.JPEG"))
    elif change == "new_class":
        _touch(os.path.join(root, "n04", "n04_0.JPEG"))
    else:
        os.rename(os.path.join(root, "n02"), os.path.join(root, "n05"))
    after = listing.cached_listing(root, walk, clock_ns=lambda: NOW)
    assert walk.calls == 2 and after == list_image_files(root) and after != before


def test_a_just_modified_tree_is_not_cached(tmp_path, cache):
    root = str(tmp_path / "train")
    _tree(root)
    walk = _Counting()
    recent = lambda: PAST + 1_000_000_000  # the listing starts 1 s after the last change  # noqa: E731
    listing.cached_listing(root, walk, clock_ns=recent)
    listing.cached_listing(root, walk, clock_ns=recent)
    assert walk.calls == 2 and not [p for p in os.listdir(cache) if p.endswith(".txt")]


def test_cache_off_and_unusable_cache_folder_list_every_time(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "train")
    _tree(root)
    walk = _Counting()
    monkeypatch.setenv("REGIONSSL_CACHE_DIR", "")
    listing.cached_listing(root, walk, clock_ns=lambda: NOW)
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("")
    monkeypatch.setenv("REGIONSSL_CACHE_DIR", str(blocker))
    assert len(listing.cached_listing(root, walk, clock_ns=lambda: NOW)) == 6
    assert walk.calls == 2 and "without a cache" in caplog.text


def _list_in_child(root, log):
    def walk(r, dirs):
        with open(log, "a") as f:
            f.write("listed\n")
        return list_image_files(r, dirs)

    listing.cached_listing(root, walk, clock_ns=lambda: NOW)


def test_concurrent_processes_list_once(tmp_path, cache):
    root = str(tmp_path / "train")
    _tree(root)
    log = str(tmp_path / "log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_list_in_child, args=(root, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with open(log) as f:
        assert f.read() == "listed\n"


def test_symlinked_directories_are_not_followed(tmp_path, cache):
    root = tmp_path / "train"
    _tree(str(root))
    os.symlink(root, root / "n01" / "loop")  # a link to a parent: following it never ends
    os.symlink(root / "n02", root / "n02_again")
    files = get_pretrain_dataset_dicts([f"folder:{root}"])
    assert len(files) == 6


def test_file_list_dataset(tmp_path):
    _touch(str(tmp_path / "imgs" / "a.jpg"))
    _touch(str(tmp_path / "elsewhere" / "b.png"))
    lst = tmp_path / "imgs" / "train.txt"
    lst.write_text(f"# train split\na.jpg\n\n  {tmp_path / 'elsewhere' / 'b.png'}  \nmissing.jpg\n")
    dicts = get_pretrain_dataset_dicts([f"filelist:{lst}"])
    assert [d["file_name"] for d in dicts] == [
        str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "elsewhere" / "b.png"), str(tmp_path / "imgs" / "missing.jpg")]
    assert [d["image_id"] for d in dicts] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        get_pretrain_dataset_dicts([f"filelist:{tmp_path / 'nope.txt'}"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        get_pretrain_dataset_dicts([f"filelist:{empty}"])

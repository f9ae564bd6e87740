"""The demo photo set: real photos that ship inside installed packages, read in place.

``regionssl_demo_images`` (all), ``regionssl_demo_images_train`` and ``regionssl_demo_images_heldout``
are image-only datasets of the colour photos of scikit-image (CC0 / public domain), scikit-learn
(CC BY 2.0) and matplotlib; nothing is downloaded or copied into the repository.
"""
import importlib.util
import os

from detectron2.data import DatasetCatalog

__all__ = ["demo_image_files", "register_demo_images"]

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                   "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
_PHOTOS = (("skimage", "data", _SKIMAGE_PHOTOS),
           ("sklearn", os.path.join("datasets", "images"), ("china.jpg", "flower.jpg")),
           ("matplotlib", os.path.join("mpl-data", "sample_data"), ("grace_hopper.jpg",)))
# Held out from "_train" (distinct scenes; the motorcycle stereo pair stays together in train).
_HELDOUT = ("chelsea.png", "coffee.png", "rocket.jpg", "grace_hopper.jpg")


def demo_image_files():
    """Sorted paths of the colour photos shipped inside the installed packages (read in place)."""
    paths = []
    for package, subdir, names in _PHOTOS:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        for base in (spec.submodule_search_locations or []) if spec else []:
            paths += [os.path.join(base, subdir, n) for n in names]
    paths = sorted(p for p in set(paths) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError("No demo photos found: install scikit-image and/or matplotlib "
                                "(they ship astronaut.png, chelsea.png, grace_hopper.jpg, ...).")
    return paths


def _demo_dicts(subset):
    from PIL import Image  # header-only read of the size; loaded lazily

    paths = demo_image_files()
    heldout = [p for p in paths if os.path.basename(p) in _HELDOUT]
    if not heldout or len(heldout) == len(paths):  # unusual installs: every third image
        heldout = paths[1::3]
    if subset == "train":
        paths = [p for p in paths if p not in heldout]
    elif subset == "heldout":
        paths = heldout
    dicts = []
    for p in paths:
        with Image.open(p) as im:
            width, height = im.size
        dicts.append({"file_name": p, "image_id": os.path.splitext(os.path.basename(p))[0],
                      "height": height, "width": width})
    return dicts


def register_demo_images():
    """Register ``regionssl_demo_images`` (all), ``..._train`` and ``..._heldout`` (image-only)."""
    for name, subset in (("regionssl_demo_images", "all"), ("regionssl_demo_images_train", "train"),
                         ("regionssl_demo_images_heldout", "heldout")):
        if name not in DatasetCatalog:
            DatasetCatalog.register(name, lambda subset=subset: _demo_dicts(subset))

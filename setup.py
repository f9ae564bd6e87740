from setuptools import find_packages, setup

setup(
    name="regionssl",
    version="0.1.0",
    description="Region-level self-supervised pretraining for object detection, inside Detectron2",
    packages=find_packages(include=["regionssl", "regionssl.*"]),
    python_requires=">=3.10",
)

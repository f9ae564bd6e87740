from setuptools import find_packages, setup

setup(
    name="regionssl",
    version="0.1.0",
    description="Region-level self-supervised pretraining for object detection, inside Detectron2",
    packages=find_packages(include=["regionssl", "regionssl.*"]),
    python_requires=">=3.10",
    # optional integrations (requirements-extra.txt): pip install -e ".[slurm,wandb,mlflow]"
    extras_require={"slurm": ["submitit>=1.5.4"], "wandb": ["wandb>=0.31.0"], "mlflow": ["mlflow-skinny>=3.17.2"]},
)

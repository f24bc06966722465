import sys

from setuptools import find_packages, setup

# Editable only: the package reads configs/ and tools/ from the clone around it (the benchmarks' base configs, the
# demo's configs, tools/submit.py's scripts), which a wheel or `setup.py install` would not carry.
if any(arg.startswith("bdist") or arg == "install" for arg in sys.argv[1:]):
    sys.exit("mae_det installs editable only, from its clone: `pip install -e .` (make setup does it); a wheel or "
             "`pip install .` would leave out the configs/ and tools/ the package reads")

setup(
    name="mae_det",
    version="0.1.0",
    description="Masked-autoencoder pretraining of Vision Transformers for Detectron2 Mask R-CNN",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mae_det", "mae_det.*"]),
    # Detectron2 is not listed: it has no PyPI release. scripts/setup_env.sh provides it (see README).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "numpy",
        "fvcore",
        "iopath",
        "pycocotools",
        "opencv-python-headless",
        "Pillow",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "yacs",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist", "hypothesis", "transformers>=4.40"],
        "cluster": ["submitit>=1.5"],  # tools/submit.py (SLURM); the tests run it with its local executor
    },
)

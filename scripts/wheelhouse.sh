#!/usr/bin/env bash
# mae_det's runtime packages for a machine that has PyTorch but no internet (a cluster's compute nodes, a lent GPU
# machine): download them here, copy the folder there, install them into a folder of your choice there.
#
#   bash scripts/wheelhouse.sh download DIR [PYTHON_VERSION [TORCHCODEC_VERSION]]   # here: default 3.12, 0.17.0
#   bash scripts/wheelhouse.sh install DIR TARGET                                    # there: then
#   export PYTHONPATH=TARGET
#
# What is downloaded is what a stock PyTorch image (torch, torchvision, numpy, Pillow, OpenCV, matplotlib, tqdm,
# tabulate, PyYAML, TensorBoard) lacks: Detectron2 (sal-detectron2, see README) and its runtime, cloudpickle
# (Detectron2 and submitit import it), pycocotools, timm, submitit (tools/submit.py), TorchCodec (its version must
# suit the torch there: 0.16 for torch 2.11-2.13, 0.17 for 2.14) and setuptools < 81 (detectron2.model_zoo imports
# pkg_resources). Pure-Python packages are built as py3 wheels (fvcore, iopath and antlr4 have no wheel on PyPI);
# pycocotools and TorchCodec are taken for PYTHON_VERSION on manylinux x86-64. One DIR may hold the downloads for
# several Python versions: install takes the ones for its interpreter (keep one TorchCodec version per Python).
# The versions are the ones scripts/setup_env.sh installs here. Installing needs no network and no compiler.
set -euo pipefail
# DIR and TARGET are relative to where the command runs, not to the repository this script moves to.
abspath() { [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }
mode=${1:-}
case "$mode" in
download) dir=$(abspath "${2:?download needs a folder}") ;;
install)
    dir=$(abspath "${2:?install needs the folder of wheels}")
    target=$(abspath "${3:?install needs a target folder}") ;;
*) sed -n '2,/^set /{/^#/p}' "$0"; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3

PURE=(fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1 hydra-core==1.3.8
      antlr4-python3-runtime==4.9.3 portalocker==4.4.2 cloudpickle==3.1.3 timm==1.0.31 submitit==1.5.4
      "setuptools==80.10.2")
COCO=pycocotools==2.0.11
D2=sal-detectron2==0.7.2

case "$mode" in
download)
    pyver=${3:-3.12}
    codec=${4:-0.17.0}
    mkdir -p "$dir"
    "$PY" -m pip wheel --quiet --no-deps -w "$dir" "${PURE[@]}"
    # Detectron2's wheel is tagged cp310 but its Python part runs on 3.10-3.12 (as scripts/setup_env.sh installs it)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 -d "$dir" "$D2"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" -d "$dir" "$COCO" "torchcodec==$codec"
    du -sh "$dir"
    ls "$dir"
    ;;
install)
    if ! compgen -G "$dir/*.whl" > /dev/null; then
        echo "[wheelhouse] error: $dir holds no wheels: make them with \`bash scripts/wheelhouse.sh download DIR\`" >&2
        exit 1
    fi
    mkdir -p "$target"
    # By name from the folder, not file by file: pip picks this interpreter's wheels among other Pythons' (TorchCodec:
    # the version downloaded for it).
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$target" --find-links "$dir" \
        "${PURE[@]}" "$COCO" torchcodec
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$target" --python-version 3.10 \
        --only-binary=:all: --find-links "$dir" "$D2"
    rm -rf "$target/tools"  # Detectron2's scripts, which would shadow this project's tools/
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import cloudpickle, detectron2, fvcore, pycocotools, submitit, timm
print('[wheelhouse] ok: detectron2', detectron2.__version__, '| timm', timm.__version__)"
    ;;
esac

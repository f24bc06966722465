#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment in .venv.
# Idempotent: a stamp keyed on this file, setup.py and the interpreter makes a second run take seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MAE_DET_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
# TorchCodec: the maintained JPEG decoder of DATA.DECODE_DEVICE cuda (torchvision's warns on every call since 0.29);
# its CPU kernel lets the suite test that path's decoder here.
torch_pins=(torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0)
d2_dist="sal-detectron2==0.7.2"
d2_runtime=(fvcore iopath pycocotools yacs termcolor tabulate cloudpickle tqdm tensorboard
            "omegaconf>=2.1,<2.4" hydra-core matplotlib Pillow packaging "setuptools<81")

version_of() { "$1" -c 'import sys;print(sys.version.split()[0])'; }
if ! version_of "$python" > /dev/null 2>&1; then
  echo "[setup] error: PYTHON=$python is not a Python interpreter that runs here" >&2
  exit 1
fi
# An existing environment keeps its interpreter: refuse another one instead of stamping a version it does not run.
if [[ -x "$venv/bin/python" && "$(version_of "$venv/bin/python")" != "$(version_of "$python")" ]]; then
  echo "[setup] error: $venv runs Python $(version_of "$venv/bin/python"), not $python's $(version_of "$python"):" \
       "remove $venv to rebuild it with that interpreter" >&2
  exit 1
fi
stamp_key="$(cat scripts/setup_env.sh setup.py | sha256sum | cut -c1-16)-$(version_of "$python")"
stamp="$venv/.mae_det_setup_stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_key" ]]; then
  echo "[setup] environment up to date: $venv"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -m pip install --quiet --upgrade pip

# PyPI's x86_64 torch is the CUDA build: with its nvidia-* wheels the venv takes ~6 GB. Say so before pip runs out
# of disk halfway through (seen on a CI machine whose disk old clones had filled).
need_kb=$((6500 * 1024))
if ! "$vpy" -c "import torch" 2>/dev/null; then
  free_kb="$(df -Pk "$venv" | awk 'NR == 2 {print $4}')"
  if (( free_kb < need_kb )); then
    echo "[setup] error: $venv needs ~6.5 GB free for torch and its CUDA libraries; its disk has $((free_kb / 1024)) MB free" >&2
    exit 1
  fi
fi

echo "[setup] installing ${torch_pins[*]}"
"$vpy" -m pip install --quiet "${torch_pins[@]}"

if "$vpy" -c "import detectron2" 2>/dev/null && [[ ! -f "$venv/.mae_det_sal_detectron2" ]]; then
  echo "[setup] detectron2 already importable ($("$vpy" -c 'import detectron2;print(detectron2.__version__, detectron2.__file__)')): leaving it alone"
else
  purelib="$("$vpy" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
  if ! "$vpy" -c "import detectron2" 2>/dev/null; then
    echo "[setup] installing pure-Python Detectron2 from PyPI ($d2_dist) into $purelib"
    # --target + --python-version: the wheel is tagged cp310; its Python part runs on 3.11-3.13 too (suite run on each).
    "$vpy" -m pip install --quiet --no-deps --upgrade --target "$purelib" \
      --python-version 3.10 --only-binary=:all: "$d2_dist"
    touch "$venv/.mae_det_sal_detectron2"
  fi
  # The wheel ships Detectron2's scripts as a top-level `tools` package that would shadow this project's tools/.
  rm -rf "$purelib/tools"
  "$vpy" -m pip install --quiet "${d2_runtime[@]}"
fi

echo "[setup] installing mae_det (editable, with the dev and cluster extras)"
# pip reports that sal-detectron2's metadata asks for numpy<2 and black: Mask R-CNN trains and evaluates
# with current numpy (tested in the suite), so that warning is expected.
"$vpy" -m pip install --quiet -e ".[dev,cluster]"
"$vpy" -c "import mae_det, detectron2, timm; print('[setup] ok: mae_det', mae_det.__version__, '| detectron2', detectron2.__version__, '| timm', timm.__version__)"
echo "$stamp_key" > "$stamp"

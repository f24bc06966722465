#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment in .venv ($MAE_DET_VENV when set).
# Idempotent: a stamp keyed on this file, setup.py, the clone's folder and the interpreter makes a second run take
# seconds. `bash scripts/setup_env.sh --check` only says whether it is up to date (exit 0) or not (exit 1).
set -euo pipefail

check_only=0
case "${1:-}" in
  "") ;;
  --check) check_only=1 ;;
  *) echo "[setup] error: unknown argument '$1' (expected --check or none)" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MAE_DET_VENV:-$root/.venv}"
vpy="$venv/bin/python"
# TorchCodec: the maintained JPEG decoder of DATA.DECODE_DEVICE cuda (torchvision's warns on every call since 0.29);
# its CPU kernel lets the suite test that path's decoder here.
torch_pins=(torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0)
d2_dist="sal-detectron2==0.7.2"
# Written before sal-detectron2 is installed: a run interrupted during that install must not leave a Detectron2
# that the next run takes for the user's own build (and so never installs its runtime packages for).
d2_marker="$venv/.mae_det_sal_detectron2"
d2_runtime=(fvcore iopath pycocotools yacs termcolor tabulate cloudpickle tqdm tensorboard
            "omegaconf>=2.1,<2.4" hydra-core matplotlib Pillow packaging "setuptools<81")

die() { echo "[setup] error: $*" >&2; exit 1; }
version_of() { "$1" -c 'import sys;print(sys.version.split()[0])' 2>/dev/null; }

# An existing environment keeps its interpreter, so the make targets (which run this without PYTHON) reuse one built
# with PYTHON=python3.12; an explicit PYTHON of another X.Y is refused rather than stamped as if it ran there.
if [[ -e "$vpy" || -L "$vpy" ]]; then
  venv_version="$(version_of "$vpy")" \
    || die "$vpy does not run (its interpreter was removed?): remove $venv to rebuild it"
  if [[ -n "${PYTHON:-}" ]]; then
    python_version="$(version_of "$PYTHON")" || die "PYTHON=$PYTHON is not a Python interpreter that runs here"
    [[ "${python_version%.*}" == "${venv_version%.*}" ]] \
      || die "$venv runs Python $venv_version, not $PYTHON's $python_version:" \
             "remove $venv to rebuild it with that interpreter"
  fi
  python="$vpy"
else
  python="${PYTHON:-python3}"
  venv_version="$(version_of "$python")" || die "PYTHON=$python is not a Python interpreter that runs here"
fi
# The clone's folder is in the key: a MAE_DET_VENV shared by two clones gets the editable install of the one that ran
# last. Hashed by Python because sha256sum is not everywhere (macOS) and a failing pipe here once left an empty key.
stamp_key="$("$python" -c 'import hashlib, sys
h = hashlib.sha256(sys.argv[1].encode())
for name in sys.argv[2:]:
    h.update(open(name, "rb").read())
print(h.hexdigest()[:16])' "$root" scripts/setup_env.sh setup.py)-$venv_version" \
  || die "$python could not hash scripts/setup_env.sh and setup.py for $venv/.mae_det_setup_stamp"
stamp="$venv/.mae_det_setup_stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_key" ]]; then
  echo "[setup] environment up to date: $venv"
  exit 0
fi
if (( check_only )); then
  echo "[setup] $venv is not up to date with this clone: run make setup"
  exit 1
fi

# What the environment already has decides what is installed. A Detectron2 this script did not install (the user's
# own build, compiled against the torch there) is left alone, and so is that torch.
have_torch=0
d2=none  # none | ours | where another Detectron2 imports from
if [[ -x "$vpy" ]]; then
  if "$vpy" -c "import torch" 2>/dev/null; then have_torch=1; fi
  d2="$("$vpy" -c 'import importlib.metadata as md, importlib.util
spec = importlib.util.find_spec("detectron2")
try:
    md.distribution("sal-detectron2")
    print("none" if spec is None else "ours")
except md.PackageNotFoundError:
    print("none" if spec is None else spec.origin)')"
  [[ "$d2" == none || ! -f "$d2_marker" ]] || d2=ours
fi
own_d2=""
[[ "$d2" == none || "$d2" == ours ]] || own_d2="$d2"
if [[ -n "$own_d2" ]]; then
  echo "[setup] detectron2 at $own_d2 is not sal-detectron2 (your own build?): leaving it and torch alone"
  if ! err="$("$vpy" -c "import detectron2.config, detectron2.engine" 2>&1)"; then
    die "detectron2 at $own_d2 (left alone) does not import: $(tail -n 1 <<< "$err"); install what it needs into" \
        "$venv, or remove it (or take it off PYTHONPATH) to let this script install sal-detectron2"
  fi
fi

# PyPI's x86_64 torch is the CUDA build: with its nvidia-* wheels the venv takes ~6 GB. Say so before pip runs out
# of disk halfway through (seen on a CI machine whose disk old clones had filled).
if (( ! have_torch )) && [[ -z "$own_d2" ]]; then
  need_kb=$((6500 * 1024))
  disk="$venv"
  while [[ ! -d "$disk" ]]; do disk="$(dirname "$disk")"; done
  free_kb="$(df -Pk "$disk" | awk 'NR == 2 {print $4}')"
  if (( free_kb < need_kb )); then
    die "$venv needs ~6.5 GB free for torch and its CUDA libraries; its disk has $((free_kb / 1024)) MB free"
  fi
fi

created=0
if [[ ! -x "$vpy" ]]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
  created=1
fi
# Left without pip by a Ctrl-C during the venv's ensurepip (or by a Debian Python without python3-venv).
if ! "$vpy" -m pip --version > /dev/null 2>&1; then
  echo "[setup] $venv has no pip: installing it with ensurepip"
  "$vpy" -m ensurepip --upgrade --default-pip > /dev/null 2>&1 || true
  "$vpy" -m pip --version > /dev/null 2>&1 \
    || die "$venv has no pip and ensurepip cannot install it:" \
           "remove $venv (on Debian/Ubuntu install python3-venv) and re-run"
fi
# Only a new environment or an old pip is upgraded: a re-run with everything installed needs no network for it.
if (( created )) || ! "$vpy" -c 'import pip, sys; sys.exit(int(pip.__version__.split(".")[0]) < 23)' 2>/dev/null; then
  "$vpy" -m pip install --quiet --upgrade pip
fi

if [[ -z "$own_d2" ]]; then
  echo "[setup] installing ${torch_pins[*]}"
  "$vpy" -m pip install --quiet "${torch_pins[@]}"
  purelib="$("$vpy" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
  if [[ "$d2" == none ]] || ! "$vpy" -c "import detectron2" 2>/dev/null; then
    echo "[setup] installing pure-Python Detectron2 from PyPI ($d2_dist) into $purelib"
    touch "$d2_marker"
    # --target + --python-version: the wheel is tagged cp310; its Python part runs on 3.11-3.13 too (suite run on each).
    "$vpy" -m pip install --quiet --no-deps --upgrade --target "$purelib" \
      --python-version 3.10 --only-binary=:all: "$d2_dist"
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

#!/usr/bin/env bash
# Create (or refresh) the project venv with the offline Detectron2 stack.
# Idempotent: a second run only checks what is there. Downloads nothing but packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REGIONSSL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.regionssl-setup-v5"  # bump when the installed set changes

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import detectron2, torch, torchvision, regionssl, regionssl_workbench, simplejpeg" 2>/dev/null; then
  exit 0
fi

echo "[setup] creating venv at $VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=23" >/dev/null
echo "[setup] torch 2.14.1 + torchvision 0.29.1 (several GB on x86_64, from the local disk where present)"
"${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
echo "[setup] runtime dependencies (Detectron2's and regionssl's)"
"${PIP[@]}" install -r "$ROOT/requirements.txt"
echo "[setup] tests and demo (pytest, scikit-image; integrations submitit, wandb, mlflow-skinny)"
"${PIP[@]}" install -r "$ROOT/requirements-test.txt"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "[setup] Detectron2 (sal-detectron2==0.7.2: official source at a59f0563, wheel tagged cp310)"
  "${PIP[@]}" install --no-deps --python-version 3.10 --only-binary=:all: \
      --target "$SITE" --upgrade sal-detectron2==0.7.2
fi
# The wheel ships a top-level `tools` package that would shadow ours (and anybody's).
rm -rf "$SITE/tools"
echo "[setup] regionssl (editable, pyproject.toml)"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import detectron2, torch, torchvision, regionssl, submitit, wandb, mlflow; print('[setup] ok: torch', torch.__version__, 'detectron2', detectron2.__version__)"
touch "$STAMP"

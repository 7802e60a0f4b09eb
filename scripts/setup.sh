#!/usr/bin/env bash
# Create .venv with PyTorch and moeharden. Idempotent: a second run only checks.
# PyTorch: the CPU build where there is no NVIDIA GPU (small and fast to install), the
# default (CUDA) build from PyPI where `nvidia-smi` sees one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${MOEHARDEN_VENV:-.venv}"
STAMP="$VENV/.moeharden-setup"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/constraints.txt ] && "$VENV/bin/python" -c "import torch, moeharden" 2>/dev/null; then
  exit 0
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "moeharden needs Python >= 3.10")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing the CUDA build of PyTorch" >&2
    "${PIP[@]}" install "torch>=2.4"
  else
    echo "setup: no GPU; installing the CPU build of PyTorch" >&2
    # The CPU wheels carry a +cpu local version, which pip prefers over PyPI's CUDA build of the
    # same release; where download.pytorch.org is unreachable, a local/mirrored 2.13 is used.
    "${PIP[@]}" install --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.*" \
      2> >(grep -v "is ignored" >&2) \
      || "${PIP[@]}" install "torch>=2.4"
  fi
fi
# the transformers the families registry was checked against (scripts/constraints.txt says why)
"${PIP[@]}" install -c scripts/constraints.txt -e ".[test]" 2> >(grep -v "is ignored" >&2)
touch "$STAMP"

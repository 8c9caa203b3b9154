#!/usr/bin/env bash
# Installs fairseq-knnlm and everything it needs into the current Python
# (activate a virtual environment first if you want one).  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU torch by default; on a GPU machine install the CUDA build of torch first
# and set FAISS=gpu to get faiss-gpu instead of faiss-cpu.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if [ "${FAISS:-cpu}" = "gpu" ]; then extra="gpu,test"; else extra="cpu,test"; fi
"$PY" -m pip install --quiet -e ".[${extra}]"
"$PY" -c "import fairseq, faiss, fairseq_knnlm; print('fairseq', fairseq.__version__, '| faiss', faiss.__version__)"

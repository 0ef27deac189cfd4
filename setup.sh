#!/usr/bin/env bash
# Create .venv in the repository root with the project and everything it needs (idempotent).
# mmcv (the swin archive's) is built from its sdist the first time (about 20 minutes on 2 cores, with progress) and
# installed from a cache outside the repository afterwards: see tools/mmcv-wheel.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,swin]"
tools/mmcv-wheel.sh .venv/bin/python
.venv/bin/python -c "import mmcv.ops, mmdet.apis" || {
  echo "setup.sh: mmcv's ops do not load; delete the cached wheel (tools/mmcv-wheel.sh says where) to rebuild it" >&2
  exit 1
}

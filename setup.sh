#!/usr/bin/env bash
# Create .venv in the repository root with the project installed (idempotent).
#
#   ./setup.sh         the serving core: every archive but swin, the client, the gateway (a few minutes)
#   ./setup.sh --all   also the test tools and the swin archive's mmdet; mmcv is built from its sdist the first
#                      time (about 20 minutes on 2 cores) and installed from a cache outside the repository
#                      afterwards (tools/mmcv-wheel.sh). The README's test command and CI use this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
case "${1:-}" in
  "") extras="" ;;
  --all) extras="[test,swin]" ;;
  *) echo "usage: ./setup.sh [--all]" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".$extras"
[ -n "$extras" ] || exit 0
tools/mmcv-wheel.sh .venv/bin/python
.venv/bin/python -c "import mmcv.ops, mmdet.apis" || {
  echo "setup.sh: mmcv's ops do not load; delete the cached wheel (tools/mmcv-wheel.sh says where) to rebuild it" >&2
  exit 1
}

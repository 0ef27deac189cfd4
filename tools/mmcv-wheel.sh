#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its CPU ops for the swin archive's mmdet 3.3.0.
#
#   tools/mmcv-wheel.sh PYTHON
#
# No usable mmcv 2.x wheel exists on PyPI for this Python and torch, so the PyPI sdist is built with
# MMCV_WITH_OPS=1 against the installed torch (about 20 minutes on 2 cores). The wheel is kept in
# ${VISION_ATTRIBUTION_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vision-attribution}/wheels/torch-VERSION/, outside
# the repository, and later set-ups install it from there in seconds. mmcv's sources are unpacked and
# patched in a build directory under that cache, never in the repository.
set -euo pipefail
python=$(command -v "${1:?usage: tools/mmcv-wheel.sh PYTHON}"); python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
version=2.1.0
cache=${VISION_ATTRIBUTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vision-attribution}
torch_version=$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')
wheels="$cache/wheels/torch-$torch_version"
wheel=$(ls "$wheels"/mmcv-$version-*.whl 2>/dev/null | head -1 || true)

if [ -z "$wheel" ]; then
  echo "mmcv $version: no cached wheel for torch $torch_version; building it from the PyPI sdist (about 20 min on 2 cores)"
  build="$cache/build/mmcv-$version-torch-$torch_version"
  rm -rf "$build"; mkdir -p "$build" "$wheels"
  # Build requirements, in the project environment (no build isolation: the ops compile against its torch).
  "$python" -m pip install --quiet "setuptools<80" ninja
  "$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "mmcv==$version" -d "$build"
  tar -xzf "$build/mmcv-$version.tar.gz" -C "$build"
  # torch >= 2.15's headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$version/setup.py"
  log="$build/build.log"
  ( cd "$build/mmcv-$version" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$(nproc) \
      "$python" -m pip wheel --no-build-isolation --no-deps -v -w "$wheels" . ) >"$log" 2>&1 &
  builder=$!
  # Progress: ninja prints "[k/n]" per compiled source.
  while kill -0 "$builder" 2>/dev/null; do
    sleep 30
    step=$(grep -o '\[[0-9]*/[0-9]*\]' "$log" | tail -1 || true)
    echo "mmcv build: ${step:-configuring} ($(date +%H:%M:%S))"
  done
  if ! wait "$builder"; then
    tail -40 "$log" >&2
    echo "mmcv build failed; the whole log is $log" >&2
    exit 1
  fi
  wheel=$(ls "$wheels"/mmcv-$version-*.whl | head -1)
  rm -rf "$build/mmcv-$version"
  echo "mmcv: built $wheel"
fi
"$python" -m pip install --quiet --no-deps "$wheel"

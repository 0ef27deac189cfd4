#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its CPU ops for the swin archive's mmdet 3.3.0.
#
#   tools/mmcv-wheel.sh PYTHON
#
# No usable mmcv 2.x wheel exists on PyPI for this Python and torch, so the PyPI sdist is built with
# MMCV_WITH_OPS=1 against PYTHON's installed torch (about 20 minutes on 2 cores). The wheel is kept in
# ${VISION_ATTRIBUTION_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vision-attribution}/wheels/torch-VERSION/, outside
# the repository, and later set-ups install it from there in seconds. mmcv's sources are unpacked and
# patched in a build directory under that cache, never in the repository. mmcv is installed without its
# dependencies: setup.sh installs them (the project's "swin" extra), pinned.
set -euo pipefail
python=$(command -v "${1:?usage: tools/mmcv-wheel.sh PYTHON}"); python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
version=2.1.0
cache=${VISION_ATTRIBUTION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vision-attribution}
read -r torch_version python_tag < <("$python" -c 'import sys, torch; print(torch.__version__.split("+")[0], f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels="$cache/wheels/torch-$torch_version"
cached_wheel() { ls "$wheels"/mmcv-$version-$python_tag-*.whl 2>/dev/null | head -1 || true; }

mkdir -p "$wheels"
exec 9>"$wheels/.mmcv-$version-$python_tag.lock"
flock 9  # another set-up building the same wheel: wait for it, then use its wheel
wheel=$(cached_wheel)
if [ -z "$wheel" ]; then
  echo "mmcv $version: no cached wheel for torch $torch_version / $python_tag; building it from the PyPI sdist (about 20 min on 2 cores)"
  build="$cache/build/mmcv-$version-torch-$torch_version-$python_tag"
  rm -rf "$build"; mkdir -p "$build/out"
  # Build requirements, in PYTHON's environment (no build isolation: the ops compile against its torch);
  # torch's extension builder compiles MAX_JOBS sources at a time with ninja, found on PATH.
  "$python" -m pip install --quiet "setuptools<80" ninja
  "$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "mmcv==$version" -d "$build"
  tar -xzf "$build/mmcv-$version.tar.gz" -C "$build"
  # torch >= 2.15's headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$version/setup.py"
  log="$build/build.log"
  started=$SECONDS
  PATH="$(dirname "$python"):$PATH" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$(nproc) \
    "$python" -m pip wheel --no-build-isolation --no-deps -v -w "$build/out" "$build/mmcv-$version" >"$log" 2>&1 &
  builder=$!
  trap 'kill "$builder" 2>/dev/null || true' EXIT
  # Progress: ninja logs "[k/n]" as it starts compiling source k of n.
  while kill -0 "$builder" 2>/dev/null; do
    sleep 30
    step=$(grep -o '\[[0-9]*/[0-9]*\]' "$log" | tail -1 | tr -d '[]' || true)
    echo "mmcv build: ${step:+source $step compiling, }$(( (SECONDS - started) / 60 )) min elapsed (log: $log)"
  done
  if ! wait "$builder"; then
    tail -40 "$log" >&2
    echo "mmcv build failed; the whole log is $log" >&2
    exit 1
  fi
  trap - EXIT
  built=$(ls "$build"/out/mmcv-$version-*.whl | head -1)
  mv "$built" "$wheels/"  # into the cache only once complete
  wheel="$wheels/$(basename "$built")"
  rm -rf "$build/mmcv-$version" "$build/out"
  echo "mmcv: built $wheel in $(( (SECONDS - started) / 60 )) min"
fi
"$python" -m pip install --quiet --no-deps "$wheel"

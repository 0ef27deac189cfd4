# syntax=docker/dockerfile:1.7
# TorchServe serving this project's archives. Build (BuildKit):
#   docker build -t vision-attribution:cpu .                          CPU image, effnet + selfie baked in
#   docker build --target cuda -t vision-attribution:cuda .           the same for GPU nodes (NVIDIA runtime)
#   docker build --build-arg ARCHIVES="effnet" --build-arg BAKE_MODEL_STORE=true .
#                                      also bake the .mar files in ./model_store (built with ./archive.sh)
#   docker build --build-arg WITH_MMCV=true --build-arg EXTRAS=swin .  for archives on mmdet (swin): mmcv's
#                                      wheel from the mmcv stage, EXTRAS = the project's extras they need
#                                      (with either, the base stage adds the libraries opencv-python loads)
# Run:
#   docker run -p 8080:8080 -p 8081:8081 -p 8082:8082 vision-attribution:cpu
#   docker run -v $PWD/model_store:/srv/vision-attribution/model-store:ro ...      mount a model store
#   docker run -v $PWD/my.properties:/srv/vision-attribution/config/config.properties:ro ...
# tools/rootfs_proof.py runs these steps in a Debian bookworm root without Docker (see docs/deployment.md, "Verified without Docker").

# Debian bookworm: it has openjdk-17 (trixie, today's python:3.11-slim, does not). Pinned to a patch release.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# opencv-python, which mmcv, mmengine and mmdet import (the swin extra), loads libGL and GLib, which the slim
# image lacks: added when the image carries mmcv or the swin extra, in this stage, since both the archives
# stage (archive.sh swin loads the model) and the runtime stage need them.
ARG WITH_MMCV=false
ARG EXTRAS=
RUN case "$WITH_MMCV,$EXTRAS" in true,*|*swin*) opencv_libraries="libgl1 libglib2.0-0" ;; *) opencv_libraries= ;; esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini $opencv_libraries \
 && rm -rf /var/lib/apt/lists/*

# The project and its runtime dependencies (not the test extra) in /opt/venv. The PyPI torch wheels carry
# CUDA, so the same environment runs on CPU and on GPU; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# gives a smaller CPU-only image instead.
FROM base AS venv
ARG TORCH_INDEX_URL=
ARG EXTRAS=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vision_attribution ./vision_attribution
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".${EXTRAS:+[$EXTRAS]}"

# mmcv 2.1.0 with its ops (the swin archive's mmdet needs it) has no usable wheel on PyPI: it is built here,
# once, against the venv's torch; the layer and the wheel cache survive later builds, so only the first
# build pays the ~20 minutes. Without WITH_MMCV=true this stage leaves /wheels empty.
FROM venv AS mmcv
ARG WITH_MMCV=false
COPY tools/mmcv-wheel.sh /src/tools/mmcv-wheel.sh
RUN --mount=type=cache,target=/root/.cache/vision-attribution --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /wheels \
 && if [ "$WITH_MMCV" = true ]; then \
      apt-get update && apt-get install -y --no-install-recommends build-essential \
      && VISION_ATTRIBUTION_CACHE=/root/.cache/vision-attribution tools/mmcv-wheel.sh /opt/venv/bin/python \
      && cp /root/.cache/vision-attribution/wheels/torch-*/mmcv-*.whl /wheels/; \
    fi

# The archives: ARCHIVES are built here (those with embedded default weights need nothing else);
# BAKE_MODEL_STORE=true adds the .mar files of the build context's model_store/ (archives you built
# from your checkpoints with ./archive.sh); ARCHIVE_FLAGS go to every ./archive.sh (e.g. --kserve-v2).
FROM venv AS archives
ARG ARCHIVES="effnet selfie"
ARG ARCHIVE_FLAGS=
ARG BAKE_MODEL_STORE=false
COPY --from=mmcv /wheels /wheels
RUN if ls /wheels/*.whl >/dev/null 2>&1; then pip install --no-deps /wheels/*.whl; fi
COPY archive.sh ./
COPY handlers ./handlers
COPY model_store /context-model-store
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /model-store \
 && for archive in $ARCHIVES; do ./archive.sh "$archive" --out /model-store $ARCHIVE_FLAGS || exit 1; done \
 && if [ "$BAKE_MODEL_STORE" = true ]; then cp /context-model-store/*.mar /model-store/; fi

FROM base AS runtime
ARG CONFIG_PROPERTIES=docker/config.properties
RUN useradd --uid 1000 --create-home --home-dir /home/model-server model-server
COPY --from=archives /opt/venv /opt/venv
COPY --from=archives /model-store /srv/vision-attribution/model-store
COPY ${CONFIG_PROPERTIES} /srv/vision-attribution/config/config.properties
COPY docker/entrypoint.sh /usr/local/bin/vision-attribution-serve
# TorchServe writes key_file.json to its working directory, its pid file to TMPDIR and its worker sockets
# to TEMP (the JVM's java.io.tmpdir): all in the non-root user's home.
ENV TS_CONFIG_FILE=/srv/vision-attribution/config/config.properties \
    LOG_LOCATION=/home/model-server/logs METRICS_LOCATION=/home/model-server/logs \
    TMPDIR=/home/model-server/tmp TEMP=/home/model-server/tmp
USER model-server
WORKDIR /home/model-server
RUN mkdir -p logs tmp
EXPOSE 8080 8081 8082
# Ready = every model's workers READY (TorchServe's /ping says Healthy before they load).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "vision_attribution.clients.readiness"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/vision-attribution-serve"]

# GPU nodes: the same image, asking the NVIDIA container runtime for the GPUs and their compute libraries.
FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime AS cpu

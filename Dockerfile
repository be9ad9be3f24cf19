# syntax=docker/dockerfile:1
#
# equiserve image: `python -m app serve` on port 8000, as uid 10001, weights cache on a volume.
#
# Build:
#   docker build -t equiserve .
#   docker build --build-arg TORCH_INDEX_URL=<index with CPU torch wheels> -t equiserve:cpu .
#   docker build --build-arg TORCH_INDEX_URL=<index with CUDA torch wheels> -t equiserve:cuda .
#
# Which torch build ends up in the image depends only on the index pip is pointed at, so no
# index host is written in this repository. Build arguments:
#   TORCH_INDEX_URL      index for torch/torchvision alone (the usual way to pick CPU or CUDA
#                        wheels; the index must also serve torch's own dependencies). Empty
#                        (default): torch comes from pip's normal index like everything else.
#   TORCH_PACKAGES       what to install from it, default "torch torchvision"; pin here, e.g.
#                        "torch==2.5.1+cpu torchvision==0.20.1+cpu".
#   PIP_INDEX_URL        passed to pip for every package (a mirror), unset by default.
#   PIP_EXTRA_INDEX_URL  passed to pip for every package: pass
#                        --build-arg PIP_EXTRA_INDEX_URL=... to pick CPU or CUDA wheels when
#                        pip should choose between the indexes itself.
#
# Run:
#   docker run -p 8000:8000 -v equiserve-cache:/home/equiserve/.cache equiserve
#   (add --gpus all for a CUDA build; see docker-compose.yml and docker-compose.gpu.yml)

########################################################################################
# builder: resolves and installs the Python dependencies into /opt/venv
########################################################################################
FROM python:3.11-slim AS builder

# Declared without defaults: an ARG that is not passed then stays out of pip's environment.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG TORCH_INDEX_URL
ARG TORCH_PACKAGES="torch torchvision"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

WORKDIR /build

# Only pyproject.toml: this layer and the ones below are rebuilt when the dependencies
# change, not on every code change. The app itself is not pip-installed: it runs from /app.
COPY pyproject.toml ./

# [project.dependencies] of pyproject.toml, read with the standard library (Python 3.11).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt

# torch first, from its own index when one is given, within pyproject's bounds (-c); the
# next step then finds it satisfied and leaves it alone. An empty --build-arg (what compose
# passes for an unset variable) must not reach pip as "", hence the unsets.
# TORCH_PACKAGES is split into words on purpose (SC2086); its versions are bounded by -c (DL3013).
# hadolint ignore=SC2086,DL3013
RUN [ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL; \
    if [ -n "${TORCH_INDEX_URL:-}" ]; then \
        pip install --index-url "${TORCH_INDEX_URL}" -c requirements.txt ${TORCH_PACKAGES}; \
    fi

RUN [ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL; \
    pip install -r requirements.txt \
    && pip check

########################################################################################
# runtime: slim image with the venv, the code and the model repository
########################################################################################
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="equiserve" \
      org.opencontainers.image.description="Equivariant predictions from pretrained models with lambda-equitune" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed, numeric uid/gid so that volume ownership and Kubernetes' runAsNonRoot can rely on it.
# The cache folder is created and chowned BEFORE the VOLUME line: a fresh named volume is
# seeded from the image, ownership included, so the non-root user can write into it.
RUN groupadd --system --gid 10001 equiserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/equiserve --create-home \
        --shell /usr/sbin/nologin equiserve \
    && mkdir -p /home/equiserve/.cache \
    && chown -R 10001:10001 /home/equiserve

COPY --from=builder /opt/venv /opt/venv

# Every downloaded weight (torch hub, Hugging Face hub, open_clip) lands under the volume.
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
    EQUISERVE_MODELS_DIR=/app/models

WORKDIR /app

# Code and models stay owned by root: the service can read them but not change them.
COPY app/ ./app/
COPY models/ ./models/
RUN python -m compileall -q /app/app

VOLUME ["/home/equiserve/.cache"]

USER 10001:10001

EXPOSE 8000

# No curl in the slim image: urllib raises on a non-2xx answer (503 while loading or
# draining), so the exit status is the readiness. start-period covers loading + warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('EQUISERVE_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app", "serve"]

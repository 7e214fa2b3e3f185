# fewstep: train, sample, distill and evaluate few-step generators in a container.
#   docker build -t fewstep .                      # CUDA 12.4 torch (the default)
#   docker build --build-arg TORCH=cpu -t fewstep:cpu .
#   docker run --gpus all -v "$PWD/outputs:/work/outputs" fewstep trainer=gpu method=gdd   # Hydra overrides
# Or through docker-compose.yml (README: "Run in Docker"; docs/docker.md).
FROM python:3.11-slim-bookworm

# The torch build: a PyTorch wheel index name, cu124 (CUDA 12.4) or cpu.
ARG TORCH=cu124
ARG TORCH_VERSION=2.6.0
ARG TORCHVISION_VERSION=0.21.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    FEWSTEP_CACHE=/cache/fewstep

# Full Fashion-MNIST from Debian (data=fashion_mnist reads /usr/share/fashion-mnist).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index the build argument names, so that fewstep's own install keeps it.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fewstep
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY fewstep ./fewstep
# diffusers (the version the tests ran): teachers from diffusers folders (teacher.ckpt=DIR, fewstep.sample ckpt=DIR)
RUN pip install . "diffusers==0.42.1" \
    && python -m fewstep.metrics.weights \
    && python -m fewstep.metrics.weights --check

# Runs write outputs/ (checkpoints, TensorBoard) under /work: mount a volume there.
WORKDIR /work
VOLUME ["/work/outputs", "/cache/fewstep"]

# Arguments are Hydra overrides: docker run IMAGE method=gdd trainer=gpu. Other entry points:
# docker run --entrypoint python IMAGE -m fewstep.evaluate ckpt=... (or fewstep.sample, fewstep.report).
ENTRYPOINT ["python", "-m", "fewstep.train"]
CMD []

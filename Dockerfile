# syntax=docker/dockerfile:1
# The `trainer` CLI in a CUDA image:
#   docker build -t dnn-tricks .
#   docker run --gpus all --shm-size=2g -v "$PWD/logs:/app/logs" dnn-tricks \
#     fit --config configs/fashion_mnist.yaml --config configs/trainer/ddp.yaml
#
# The base brings Python, torch and torchvision built for CUDA 13.0, cuDNN 9 and NCCL. Its
# torch satisfies pyproject's torch>=2.10, so pip keeps it and installs only the rest. For
# an older driver pick a base with an older CUDA, e.g.
#   --build-arg BASE_IMAGE=pytorch/pytorch:2.14.0-cuda12.6-cudnn9-runtime
ARG BASE_IMAGE=pytorch/pytorch:2.14.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# uid/gid of the user that owns what the container writes into the mounted logs folder;
# pass your own (--build-arg UID=$(id -u) --build-arg GID=$(id -g)) to own them on the host.
ARG UID=1000
ARG GID=1000

# Real Fashion-MNIST (30 MB) from the Debian/Ubuntu package, at the path that
# configs/fashion_mnist.yaml reads, so that config trains without network at run time.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Fail the build with a clear message when a base image's Python is older than pyproject's
# requires-python (tests/test_dockerfile.py keeps the two in step).
RUN python -c "import sys; assert sys.version_info >= (3, 10), 'dnn-tricks needs Python >= 3.10, the base has ' + sys.version"

# A venv on top of the base's site-packages: the CUDA torch stays the base's, our other
# dependencies live apart from it, and pip never touches a system-managed Python.
RUN python -m venv --system-site-packages "$VIRTUAL_ENV"

WORKDIR /app

# Dependencies first, from pyproject alone, so editing src/ does not reinstall them.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir -p src/dnn_tricks && touch src/dnn_tricks/__init__.py \
    && pip install . \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && rm -rf src build
COPY src ./src
RUN pip install --no-deps --force-reinstall . && rm -rf build

COPY configs ./configs

RUN groupadd --gid "$GID" app \
    && useradd --uid "$UID" --gid "$GID" --create-home --shell /bin/bash app \
    && mkdir -p /app/logs /app/data \
    && chown app:app /app/logs /app/data
USER app

# TensorBoard runs and checkpoints; mount a host folder here to keep them.
VOLUME /app/logs

ENTRYPOINT ["trainer"]
CMD ["--help"]

# syntax=docker/dockerfile:1.7
# Two images from one file (tests/test_images.py checks the stages, users and entrypoints):
#   docker build --target operator -t relora-operator .   (no ML stack; never imports torch)
#   docker build --target trainer  -t relora-trainer  .   (CUDA torch, transformers, peft, optuna)
#
# Base images are pinned by version; pin them by digest too for reproducible builds:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm     # prints the digest
#   docker build --build-arg PYTHON_DIGEST=sha256:<digest> --target operator .
# An empty PYTHON_DIGEST (the default) pulls by tag.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.13-slim-bookworm
ARG PYTHON_DIGEST=
# The trainer's CUDA build of torch: the version pinned in pyproject.toml, from the index of
# the CUDA release the wheels bundle (they need only the NVIDIA driver on the node).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------- the project as a wheel
FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- operator: its extra only
FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS operator-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/relora \
    && /opt/relora/bin/pip install "$(ls /wheels/*.whl)[operator]"

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS operator
# No .pyc writes and no home directory: the chart runs it with a read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/relora/bin:$PATH HOME=/tmp
COPY --from=operator-venv /opt/relora /opt/relora
RUN groupadd --gid 10001 relora \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin relora
USER 10001:10001
WORKDIR /tmp
# Metrics (RELORA_METRICS_PORT) and the liveness probe (--liveness).
EXPOSE 8080 8081
ENTRYPOINT ["relora-operator"]
CMD ["--all-namespaces"]

# ---------------------------------------------------------------- trainer: CUDA torch + method
FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS trainer-venv
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/relora \
    && /opt/relora/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/relora/bin/pip install "$(ls /wheels/*.whl)[trainer,s3]"

FROM ${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST} AS trainer
# The operator's Jobs mount an emptyDir at /tmp and make the root filesystem read-only: every
# cache (Hugging Face, the trainer's s3:// inputs under $HOME/.cache) lives below /tmp.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/relora/bin:$PATH HOME=/tmp \
    HF_HOME=/tmp/hf
COPY --from=trainer-venv /opt/relora /opt/relora
RUN groupadd --gid 10001 relora \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin relora
USER 10001:10001
WORKDIR /tmp
# The trainer Job entrypoint (the operator's RELORA_TRAINER_COMMAND); `relora run` works too.
ENTRYPOINT ["python", "-m", "relora_trainer.job"]

# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t relora-operator .   (no ML stack; never imports torch)
#   docker build --target trainer  -t relora-trainer  .   (CUDA torch, transformers, peft, optuna)
# Base images are pinned by tag; pin them by digest (@sha256:...) in your registry mirror.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/

FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=source /src /src
RUN pip install '/src[operator]' && rm -rf /src \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin relora
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["relora-operator"]
CMD ["--all-namespaces"]

FROM ${PYTHON_IMAGE} AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/tmp/hf
COPY --from=source /src /src
# The CUDA build of torch comes from the PyTorch index; the pyproject pin matches its version.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu128 '/src[trainer]' \
    && rm -rf /src \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin relora
USER 10001:10001
# The operator's Jobs run `python -m relora_trainer.job`; `relora run` works here too.
ENTRYPOINT ["python", "-m", "relora_trainer.job"]

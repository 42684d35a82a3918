# syntax=docker/dockerfile:1
# The engine image: the official vLLM image plus slofleet, so that vLLM finds slofleet's plugin
# (entry point group vllm.general_plugins) and the sidecar's KV connector and worker extension.
# Build from the repository root: docker build -f docker/engine.Dockerfile .
# The tag matches the `engine-gpu` extra in pyproject.toml (vllm==0.32.0); a test checks it.
FROM vllm/vllm-openai:v0.32.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/slofleet-src
COPY pyproject.toml ./
COPY slofleet/ slofleet/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY gateway/ gateway/
COPY local/ local/
COPY proto/ proto/
# Without the vLLM extra: the image's own vLLM and torch stay exactly as built.
RUN python3 -m pip install --no-cache-dir /opt/slofleet-src \
    && python3 -c "from importlib.metadata import entry_points as e; \
assert 'slofleet' in {p.name for p in e(group='vllm.general_plugins')}, 'plugin entry point missing'"
WORKDIR /
# The pod spec sets the command too; the API server module, never `vllm serve` (one entry point).
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]

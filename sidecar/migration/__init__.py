"""Live migration of running requests with their KV cache (Llumnix on stock vLLM), sidecar side."""

# The engine's KV connector listens here (its --kv-transfer-config control_socket) and the sidecar
# connects: a path in the pod's /dev/shm, which the engine and sidecar containers share.
DEFAULT_KV_CONTROL_SOCKET = "/dev/shm/slofleet/kv.sock"

"""Live migration of running requests with their KV cache (Llumnix on stock vLLM), sidecar side."""

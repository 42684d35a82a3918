"""The per-pod sidecar: reads its vLLM engine, exports its load and carries out commands.

It is the one owner of everything that touches its engine (DESIGN.md section 2): the operator and
the gateway reach the engine's state only through this sidecar's gRPC API (`slofleet.api.v1`).
Only the `vllm_ext` sub-package runs inside the engine and imports vLLM; the rest of the sidecar
talks to the engine over its HTTP endpoints, so it starts fast and survives engine restarts.
"""

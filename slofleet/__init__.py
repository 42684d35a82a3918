"""slofleet: LLM inference on Kubernetes to its latency targets at the lowest GPU cost.

This package is the *core*: plain-Python policies and types that the operator, gateway, sidecar,
local fleet and simulator share. It imports no kopf, kubernetes client, grpc, HTTP framework or vLLM
(tests/test_architecture.py enforces it).
"""

__version__ = "0.1.0"

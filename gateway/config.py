"""The gateway's own typed configuration (from CLI flags; the operator renders the flags).

Kept independent of the LLMService spec types so that the gateway runs on its own (tests,
benchmarks, `slofleet up`) with only the service defaults it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slofleet.instance import RequestClass
from slofleet.policies.dispatch import DispatchParams


@dataclass(frozen=True, slots=True)
class ServiceDefaults:
    """What a request gets when it says nothing about its class, priority or deadline."""

    request_class: RequestClass = RequestClass.INTERACTIVE
    interactive_priority: int = 0
    # vLLM serves lower values first, so batch work yields to interactive work on the engine too.
    batch_priority: int = 10
    batch_deadline_seconds: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # Static mode: engine base URLs the gateway tracks itself (no sidecars).
    engines: tuple[str, ...] = ()
    # Sidecar mode: host:port of each instance's sidecar gRPC endpoint.
    sidecars: tuple[str, ...] = ()
    sidecar_token: str | None = None
    # Local limit per instance in static mode (sidecars send their own).
    concurrency_limit: int = 64
    defaults: ServiceDefaults = field(default_factory=ServiceDefaults)
    dispatch: DispatchParams = field(default_factory=DispatchParams)
    # Interactive requests waiting for a slot; one more gets 429.
    max_queued_interactive: int = 256
    queue_timeout_seconds: float = 60.0
    retry_after_seconds: int = 1
    db_path: Path = Path(".slofleet/gateway.sqlite3")
    max_file_bytes: int = 100 * 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    # How often a request may move to another instance after failures before it fails.
    max_resumes: int = 4
    # No byte from the engine for this long means the instance is stuck: resume elsewhere.
    engine_read_timeout_seconds: float = 120.0
    health_interval_seconds: float = 1.0
    # Prefix-locality index over prompt text: one block is about one vLLM block of tokens.
    chars_per_block: int = 512
    log_level: str = "INFO"

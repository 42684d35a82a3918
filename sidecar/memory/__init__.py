"""The sidecar's memory commands: parameter drop/restore, warm standby and peer layer reads.

`MemoryService` implements `slofleet.v1.Memory` (proto/slofleet/api/v1/memory.proto). It drives
the engine through its dev-mode HTTP routes (`/pause?mode=keep`, `/resume`, `/collective_rpc` to
the worker methods of `slofleet.sidecar.vllm_ext.layers.LayerDropExtension`) and keeps no state
of its own: what is dropped lives in the engine, the weights live in the host weight store
(`slofleet.sidecar.weightstore`, in /dev/shm), so a restarted sidecar carries on where the last
one stopped. Add it to the sidecar's gRPC server with `add_memory_service(server, service)`.
"""

from slofleet.sidecar.memory.service import MemoryMetrics, MemoryService, add_memory_service

__all__ = ["MemoryMetrics", "MemoryService", "add_memory_service"]

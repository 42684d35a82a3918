"""`slofleet.v1.Memory`: DropLayers / RestoreLayers / Standby / Wake / Status / ReadLayers.

The order of every command is fixed by what the engine tolerates (vllm-cpu-facts.md):
- pause with requests kept before touching weights (a step through a dropped layer kills the
  engine), and stay paused while anything is dropped: requests in flight are frozen and new
  ones queue in the engine; none fails. Serving with dropped layers is issue 10's pipeline mode;
- check everything (indices, what is dropped, whether the host store or a peer holds the bytes)
  before the engine is paused, so a refused command leaves a serving engine serving;
- resume only when no unit is dropped any more.

The service holds no state of its own: the engine reports what is dropped and the store is in
/dev/shm, so a restarted sidecar (or another replica of it) carries on. Commands are serialized.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from slofleet.api.v1 import memory_pb2 as pb
from slofleet.api.v1 import memory_pb2_grpc as pb_grpc
from slofleet.sidecar.memory.engine import LAYERS_PROTOCOL, EngineCallError, EngineControl
from slofleet.sidecar.weightstore import DEFAULT_CHUNK_BYTES, StoreError, UnitEntry, WeightStore, layer_unit

log = logging.getLogger("slofleet.sidecar.memory")

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class CommandError(Exception):
    """A refused command; `code` is the gRPC status, the message names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> CommandError:
    return CommandError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _precondition(message: str) -> CommandError:
    return CommandError(grpc.StatusCode.FAILED_PRECONDITION, message)


def _unit_layer(unit: str) -> int | None:
    return int(unit.split(".")[1]) if unit.startswith("layer.") else None


def resolve_drop_layers(
    layers: Sequence[int], fraction: float, layers_total: int, dropped: Sequence[int]
) -> list[int]:
    """The layers a DropLayers request names, or why it is refused. A fraction drops the
    highest-index layers, so the layers kept stay a contiguous prefix."""
    if layers and fraction:
        raise _invalid("layers, fraction: give one of them, not both")
    if not layers and not fraction:
        raise _invalid("layers: name the layers to drop (or set fraction)")
    if layers:
        bad = sorted({i for i in layers if not 0 <= i < layers_total})
        if bad:
            raise _invalid(f"layers: {bad} do not exist; the model has layers 0..{layers_total - 1}")
        if len(set(layers)) != len(layers):
            raise _invalid(f"layers: {list(layers)} names a layer twice")
        chosen = sorted(layers)
    else:
        if not 0 < fraction <= 1:
            raise _invalid(f"fraction: must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * layers_total))
        chosen = list(range(layers_total - count, layers_total))
    again = sorted(set(chosen) & set(dropped))
    if again:
        raise _precondition(f"layers: {again} already dropped; restore them first (RestoreLayers)")
    return chosen


def resolve_restore_layers(layers: Sequence[int], layers_total: int, dropped: Sequence[int]) -> list[int]:
    """The layers a RestoreLayers request names (empty = every dropped layer), or why not."""
    if not dropped:
        raise _precondition("layers: no layer is dropped; nothing to restore")
    if not layers:
        return sorted(dropped)
    bad = sorted({i for i in layers if not 0 <= i < layers_total})
    if bad:
        raise _invalid(f"layers: {bad} do not exist; the model has layers 0..{layers_total - 1}")
    resident = sorted(set(layers) - set(dropped))
    if resident:
        raise _precondition(f"layers: {resident} are not dropped; dropped now: {sorted(dropped)}")
    return sorted(set(layers))


class MemoryMetrics:
    """The sidecar's memory metrics (registered on the sidecar's registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.layers_resident = Gauge(
            "slofleet_memory_layers_resident",
            "Decoder layers whose weights the engine holds",
            registry=registry,
        )
        self.layers = Gauge("slofleet_memory_layers", "Decoder layers of the model", registry=registry)
        self.host_store_bytes = Gauge(
            "slofleet_memory_host_store_bytes",
            "Bytes in this instance's host weight store",
            registry=registry,
        )
        self.resident_weight_bytes = Gauge(
            "slofleet_memory_resident_weight_bytes", "Weight bytes the engine holds", registry=registry
        )
        self.standby = Gauge(
            "slofleet_memory_standby", "1 while the instance is parked in warm standby", registry=registry
        )
        self.drop_seconds = Histogram(
            "slofleet_memory_drop_seconds", "DropLayers/Standby duration (pause to freed)", ["command"],
            buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.restore_seconds = Histogram(
            "slofleet_memory_restore_seconds", "RestoreLayers/Wake duration (incl. peer fetch, resume)",
            ["command"], buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.peer_bytes = Counter(
            "slofleet_memory_peer_fetch_bytes",
            "Weight bytes pulled from peers' host stores",
            registry=registry,
        )

    def observe(self, status: pb.MemoryStatus) -> None:
        self.layers_resident.set(status.layers_resident)
        self.layers.set(status.layers_total)
        self.host_store_bytes.set(status.host_store_bytes)
        self.resident_weight_bytes.set(status.resident_weight_bytes)
        self.standby.set(1 if status.standby else 0)


@dataclass(frozen=True, slots=True)
class _EngineState:
    raw: dict[str, Any]

    @property
    def layers_total(self) -> int:
        return int(self.raw["layers_total"])

    @property
    def units(self) -> list[str]:
        return list(self.raw["units"])

    @property
    def dropped_units(self) -> list[str]:
        return list(self.raw["dropped"])

    @property
    def dropped_layers(self) -> list[int]:
        return [i for i in (_unit_layer(u) for u in self.dropped_units) if i is not None]

    @property
    def fingerprint(self) -> str:
        return str(self.raw["model_fingerprint"])

    @property
    def gpu_sleep(self) -> bool:
        return self.raw.get("platform") == "gpu" and bool(self.raw.get("sleep_mode"))


class MemoryService(pb_grpc.MemoryServicer):
    def __init__(
        self,
        engine_url: str,
        store_dir: str,
        *,
        metrics: MemoryMetrics | None = None,
        peer_token: str = "",
        on_status: Callable[[pb.MemoryStatus], None] | None = None,
    ) -> None:
        self.engine = EngineControl(engine_url)
        self.store = WeightStore(store_dir)
        self.metrics = metrics or MemoryMetrics(CollectorRegistry())
        self._peer_token = peer_token
        # The sidecar's Load reports layers resident from here.
        self._on_status = on_status
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.store.ensure()
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    # --- engine and store views -------------------------------------------------------------
    async def _engine_state(self) -> _EngineState:
        raw = await self.engine.rpc("slofleet_memory_status")
        if raw.get("protocol") != LAYERS_PROTOCOL:
            raise EngineCallError(
                f"slofleet_memory_status: protocol {raw.get('protocol')!r}, this sidecar speaks "
                f"{LAYERS_PROTOCOL} (engine and sidecar run different slofleet versions?)"
            )
        return _EngineState(raw)

    async def status(self) -> pb.MemoryStatus:
        return await self._status()

    async def _status(
        self, state: _EngineState | None = None, op_seconds: float = 0.0, op_bytes: int = 0
    ) -> pb.MemoryStatus:
        state = state or await self._engine_state()
        manifest = {u: e for u, e in self.store.manifest().items() if e.model == state.fingerprint}
        unit_bytes = state.raw["unit_bytes"]
        dropped = set(state.dropped_units)
        sleeping = state.gpu_sleep and await self.engine.is_sleeping()
        status = pb.MemoryStatus(
            layers_total=state.layers_total,
            layers_resident=state.layers_total - len(state.dropped_layers),
            dropped_layers=state.dropped_layers,
            standby=sleeping or dropped == set(state.units),
            paused=await self.engine.is_paused(),
            resident_weight_bytes=sum(b for u, b in unit_bytes.items() if u not in dropped),
            dropped_weight_bytes=sum(b for u, b in unit_bytes.items() if u in dropped),
            host_store_bytes=sum(e.nbytes for e in manifest.values()),
            host_store_units=sorted(manifest),
            model_fingerprint=state.fingerprint,
            platform=str(state.raw.get("platform", "")),
            engine_worker_rss_bytes=int(state.raw.get("rss_bytes", 0)),
            last_operation_seconds=op_seconds,
            last_operation_bytes=op_bytes,
        )
        self.metrics.observe(status)
        if self._on_status is not None:
            self._on_status(status)
        return status

    def _missing_locally(self, units: Sequence[str], fingerprint: str) -> list[str]:
        return [u for u in units if self.store.matching(u, fingerprint) is None]

    async def _ensure_in_store(self, units: Sequence[str], fingerprint: str, source_peer: str) -> None:
        """Check (before pausing anything) that the store holds `units`, pulling the missing
        ones from `source_peer`."""
        missing = self._missing_locally(units, fingerprint)
        if not missing:
            return
        if not source_peer:
            raise _precondition(
                f"source_peer: {', '.join(missing)} not in this instance's host store ({self.store.root}); "
                "name a peer sidecar that holds them"
            )
        await self.fetch_from_peer(source_peer, missing, fingerprint)

    async def fetch_from_peer(self, peer: str, units: Sequence[str], fingerprint: str) -> int:
        """Copy `units` from the peer's host store into ours (digest-checked); returns bytes."""
        metadata = (("authorization", f"Bearer {self._peer_token}"),) if self._peer_token else None
        total = 0
        async with grpc.aio.insecure_channel(peer) as channel:
            stub = pb_grpc.MemoryStub(channel)
            writer = None
            got: set[str] = set()
            try:
                call = stub.ReadLayers(
                    pb.ReadLayersRequest(units=list(units), model_fingerprint=fingerprint), metadata=metadata
                )
                async for chunk in call:
                    if chunk.entry_json:
                        if writer is not None:
                            writer.commit()
                        entry = UnitEntry.from_json(json.loads(chunk.entry_json))
                        if entry.model != fingerprint or entry.unit not in units:
                            raise _precondition(f"source_peer: {peer} sent {entry.unit} of another model")
                        writer = self.store.copy_writer(entry, writer=f"peer {peer}")
                        got.add(entry.unit)
                    if writer is None:
                        raise _precondition(f"source_peer: {peer} sent data before a manifest entry")
                    writer.write(chunk.data)
                    total += len(chunk.data)
                if writer is not None:
                    writer.commit()
                    writer = None
            except grpc.aio.AioRpcError as e:
                raise _precondition(f"source_peer: {peer}: {e.code().name}: {e.details()}") from e
            except StoreError as e:
                raise _precondition(f"source_peer: {peer}: {e}") from e
            finally:
                if writer is not None:
                    writer.abort()
        lacking = sorted(set(units) - got)
        if lacking:
            raise _precondition(f"source_peer: {peer} does not hold {', '.join(lacking)}")
        self.metrics.peer_bytes.inc(total)
        log.info("pulled %s (%d bytes) from peer %s", ",".join(units), total, peer)
        return total

    # --- commands ------------------------------------------------------------------------------
    async def drop_layers(self, request: pb.DropLayersRequest) -> pb.MemoryStatus:
        async with self._lock:
            start = time.perf_counter()
            state = await self._engine_state()
            layers = resolve_drop_layers(
                list(request.layers), request.fraction, state.layers_total, state.dropped_layers
            )
            result = await self._drop([layer_unit(i) for i in layers], keep=not request.discard_host_copy)
            seconds = time.perf_counter() - start
            self.metrics.drop_seconds.labels("layers").observe(seconds)
            log.info("dropped layers %s (%d bytes) in %.3f s", layers, result["bytes"], seconds)
            return await self._status(None, seconds, int(result["bytes"]))

    async def _drop(self, units: list[str], keep: bool) -> dict[str, Any]:
        was_paused = await self.engine.is_paused()
        await self.engine.pause_keep()
        result = await self.engine.rpc(
            "slofleet_drop", ",".join(units), str(self.store.root), "1" if keep else "0"
        )
        if not result.get("ok"):
            if not was_paused and not (await self._engine_state()).dropped_units:
                await self.engine.resume()
            raise CommandError(getattr(grpc.StatusCode, result["code"]), result["message"])
        return result

    async def restore_layers(self, request: pb.RestoreLayersRequest) -> pb.MemoryStatus:
        async with self._lock:
            start = time.perf_counter()
            state = await self._engine_state()
            layers = resolve_restore_layers(list(request.layers), state.layers_total, state.dropped_layers)
            units = [layer_unit(i) for i in layers]
            await self._ensure_in_store(units, state.fingerprint, request.source_peer)
            result = await self._restore(units)
            seconds = time.perf_counter() - start
            self.metrics.restore_seconds.labels("layers").observe(seconds)
            log.info("restored layers %s (%d bytes) in %.3f s", layers, result["bytes"], seconds)
            return await self._status(None, seconds, int(result["bytes"]))

    async def _restore(self, units: list[str]) -> dict[str, Any]:
        result = await self.engine.rpc("slofleet_restore", ",".join(units), str(self.store.root))
        if not result.get("ok"):
            raise CommandError(getattr(grpc.StatusCode, result["code"]), result["message"])
        if not result["dropped_now"]:
            await self.engine.resume()
        return result

    async def save_layers(self, request: pb.SaveLayersRequest) -> pb.MemoryStatus:
        """Fill the host store from the running engine. Reading weights back needs no pause:
        the worker handles one RPC between steps, and only reads."""
        async with self._lock:
            start = time.perf_counter()
            state = await self._engine_state()
            layers = list(request.layers) or list(range(state.layers_total))
            bad = sorted({i for i in layers if not 0 <= i < state.layers_total})
            if bad:
                raise _invalid(
                    f"layers: {bad} do not exist; the model has layers 0..{state.layers_total - 1}"
                )
            gone = sorted(set(layers) & set(state.dropped_layers))
            if gone:
                raise _precondition(f"layers: {gone} are dropped; only resident layers can be saved")
            units = [layer_unit(i) for i in sorted(set(layers))]
            if request.include_embedding_and_head:
                units = ["embed", *units, "head"]
            units = [u for u in units if u not in state.dropped_units]
            result = await self.engine.rpc("slofleet_save_units", ",".join(units), str(self.store.root))
            if not result.get("ok"):
                raise CommandError(getattr(grpc.StatusCode, result["code"]), result["message"])
            seconds = time.perf_counter() - start
            log.info(
                "saved %s to the host store in %.3f s (%d written)", units, seconds, len(result["written"])
            )
            return await self._status(None, seconds, 0)

    async def standby(self, request: pb.StandbyRequest) -> pb.MemoryStatus:
        async with self._lock:
            start = time.perf_counter()
            state = await self._engine_state()
            if state.gpu_sleep:
                # UNTESTED here (no GPU): vLLM's sleep mode offloads weights and frees KV.
                if await self.engine.is_sleeping():
                    raise _precondition("standby: the instance is already in standby")
                await self.engine.sleep(1)
                nbytes = sum(state.raw["unit_bytes"].values())
            else:
                todo = [u for u in state.units if u not in state.dropped_units]
                if not todo:
                    raise _precondition("standby: the instance is already in standby (every weight dropped)")
                nbytes = int((await self._drop(todo, keep=True))["bytes"])
            seconds = time.perf_counter() - start
            self.metrics.drop_seconds.labels("standby").observe(seconds)
            log.info("standby: %d weight bytes parked in %.3f s", nbytes, seconds)
            return await self._status(None, seconds, nbytes)

    async def wake(self, request: pb.WakeRequest) -> pb.MemoryStatus:
        async with self._lock:
            start = time.perf_counter()
            state = await self._engine_state()
            if state.gpu_sleep and await self.engine.is_sleeping():
                await self.engine.wake_up()  # UNTESTED here; a full wake_up also resumes the scheduler
                nbytes = sum(state.raw["unit_bytes"].values())
            else:
                units = state.dropped_units
                if not units:
                    raise _precondition("wake: the instance is not in standby and has no dropped layer")
                await self._ensure_in_store(units, state.fingerprint, request.source_peer)
                nbytes = int((await self._restore(units))["bytes"])
            seconds = time.perf_counter() - start
            self.metrics.restore_seconds.labels("wake").observe(seconds)
            log.info("woke: %d weight bytes restored in %.3f s", nbytes, seconds)
            return await self._status(None, seconds, nbytes)

    async def read_layers(self, request: pb.ReadLayersRequest) -> AsyncIterator[pb.LayerChunk]:
        manifest = self.store.manifest()
        units = list(request.units) or sorted(manifest)
        absent = [u for u in units if u not in manifest]
        if absent:
            raise _precondition(f"units: {', '.join(absent)} not in this instance's host store")
        other = [
            u for u in units if request.model_fingerprint and manifest[u].model != request.model_fingerprint
        ]
        if other:
            raise _precondition(
                f"model_fingerprint: this store holds {', '.join(other)} of model "
                f"{manifest[other[0]].model}, not {request.model_fingerprint}"
            )
        for u in units:
            entry = manifest[u]
            offset = 0
            yield pb.LayerChunk(unit=u, entry_json=json.dumps(entry.to_json()), offset=0, data=b"")
            for data in self.store.iter_chunks(entry, DEFAULT_CHUNK_BYTES):
                yield pb.LayerChunk(unit=u, offset=offset, data=data)
                offset += len(data)
            await asyncio.sleep(0)

    # --- gRPC surface --------------------------------------------------------------------------
    async def _rpc(self, context: grpc.aio.ServicerContext, command: Any, request: Any) -> Any:
        try:
            return await command(request)
        except CommandError as e:
            await context.abort(e.code, e.message)
        except EngineCallError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine: {e}")
        except StoreError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"store: {e}")

    async def Status(
        self, request: pb.MemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryStatus:
        return await self._rpc(context, lambda _: self.status(), request)

    async def DropLayers(
        self, request: pb.DropLayersRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryStatus:
        return await self._rpc(context, self.drop_layers, request)

    async def RestoreLayers(
        self, request: pb.RestoreLayersRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryStatus:
        return await self._rpc(context, self.restore_layers, request)

    async def SaveLayers(
        self, request: pb.SaveLayersRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryStatus:
        return await self._rpc(context, self.save_layers, request)

    async def Standby(self, request: pb.StandbyRequest, context: grpc.aio.ServicerContext) -> pb.MemoryStatus:
        return await self._rpc(context, self.standby, request)

    async def Wake(self, request: pb.WakeRequest, context: grpc.aio.ServicerContext) -> pb.MemoryStatus:
        return await self._rpc(context, self.wake, request)

    async def ReadLayers(
        self, request: pb.ReadLayersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LayerChunk]:
        try:
            async for chunk in self.read_layers(request):
                yield chunk
        except CommandError as e:
            await context.abort(e.code, e.message)
        except StoreError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"store: {e}")


def add_memory_service(server: grpc.aio.Server, service: MemoryService) -> None:
    pb_grpc.add_MemoryServicer_to_server(service, server)

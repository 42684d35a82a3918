"""The sidecar's adapter to its vLLM engine, over the engine's own HTTP endpoints.

`/metrics` is read through prometheus_client's `name[]` filter at `/metrics/` (vLLM mounts
prometheus_client's ASGI app there; its plain `/metrics` route ignores the filter): the engine's
API server then renders 9 families instead of ~80, which cuts what a 10 Hz scrape costs it from
~4.3 ms to ~1.4 ms of CPU per scrape (measured on the tiny model; bench/sidecar_load.py). If an
engine answers the filtered URL wrongly, the sidecar falls back to the full page for good.

Two aiohttp sessions, on purpose:
- the *poll* session keeps one keep-alive connection for `/metrics` and `/health` at 10 Hz, so the
  engine's API server sees one idle socket, not a connect per poll;
- the *control* session (`/collective_rpc`, `/v1/models`, `/version`) closes its connections
  after each call, because a failed `/collective_rpc` leaves vLLM's keep-alive connection broken
  (vllm-cpu-facts.md) and must not take the poll connection down with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlencode

import aiohttp

from slofleet.sidecar.enginemetrics import (
    SAMPLE_NAMES,
    EngineMetricsError,
    EngineSample,
    parse_engine_metrics,
)
from slofleet.sidecar.state import EngineInfo, KVLayout

log = logging.getLogger("slofleet.sidecar.engine")

KV_LAYOUT_METHOD = "slofleet_kv_layout"
FILTERED_METRICS_PATH = "/metrics/?" + urlencode([("name[]", n) for n in SAMPLE_NAMES])
EXTENSION_PROTOCOL = 1


class EngineError(RuntimeError):
    """The engine did not answer as expected; the message says which endpoint and why."""


class VllmEngine:
    def __init__(self, url: str, *, poll_timeout_seconds: float = 2.0, control_timeout_seconds: float = 30.0):
        self.url = url.rstrip("/")
        self._poll_timeout = aiohttp.ClientTimeout(total=poll_timeout_seconds)
        self._control_timeout = aiohttp.ClientTimeout(total=control_timeout_seconds)
        self._poll: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientSession | None = None
        self.metrics_path = FILTERED_METRICS_PATH

    async def start(self) -> None:
        self._poll = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2, keepalive_timeout=30), timeout=self._poll_timeout
        )
        self._control = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=self._control_timeout
        )

    async def close(self) -> None:
        for session in (self._poll, self._control):
            if session is not None:
                await session.close()
        self._poll = self._control = None

    def _sessions(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        if self._poll is None or self._control is None:
            raise RuntimeError("VllmEngine.start() was not awaited")
        return self._poll, self._control

    async def scrape(self) -> EngineSample:
        try:
            return await self._scrape(self.metrics_path)
        except ValueError as e:  # includes EngineMetricsError
            if self.metrics_path == "/metrics":
                raise EngineError(f"GET {self.url}/metrics: {e}") from e
            filtered_error = e
        try:
            sample = await self._scrape("/metrics")
        except ValueError as e:
            raise EngineError(f"GET {self.url}/metrics: {e}") from e
        log.warning("engine ignores the /metrics/?name[]= filter (%s); reading the full page", filtered_error)
        self.metrics_path = "/metrics"
        return sample

    async def _scrape(self, path: str) -> EngineSample:
        poll, _ = self._sessions()
        try:
            async with poll.get(self.url + path) as resp:
                if resp.status == 404 and path != "/metrics":
                    raise EngineMetricsError(f"HTTP 404 for {path}")
                if resp.status != 200:
                    raise EngineError(f"GET {self.url}{path}: HTTP {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise EngineError(f"GET {self.url}/metrics: {type(e).__name__}: {e}") from e
        return parse_engine_metrics(text)

    async def healthy(self) -> bool:
        poll, _ = self._sessions()
        try:
            async with poll.get(self.url + "/health") as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _get_json(self, path: str) -> Any:
        _, control = self._sessions()
        try:
            async with control.get(self.url + path) as resp:
                if resp.status != 200:
                    raise EngineError(
                        f"GET {self.url}{path}: HTTP {resp.status}: {(await resp.text())[:200]}"
                    )
                return await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise EngineError(f"GET {self.url}{path}: {type(e).__name__}: {e}") from e

    async def collective_rpc(self, method: str, *args: str, timeout_seconds: float = 20.0) -> list[Any]:
        """Call a worker-extension method on every worker; one result per worker."""
        _, control = self._sessions()
        body = {"method": method, "args": list(args), "timeout": timeout_seconds}
        try:
            async with control.post(self.url + "/collective_rpc", json=body) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise EngineError(
                        f"POST {self.url}/collective_rpc {method}: HTTP {resp.status}: {detail} (is the "
                        f"engine started with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                        f"slofleet.sidecar.vllm_ext.worker.SlofleetWorkerExtension?)"
                    )
                payload = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise EngineError(f"POST {self.url}/collective_rpc {method}: {type(e).__name__}: {e}") from e
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list) or not results:
            raise EngineError(f"POST {self.url}/collective_rpc {method}: no results in {str(payload)[:200]}")
        return results

    async def kv_layout(self) -> KVLayout:
        results = await self.collective_rpc(KV_LAYOUT_METHOD)
        first = results[0]
        if not isinstance(first, dict) or first.get("protocol") != EXTENSION_PROTOCOL:
            raise EngineError(
                f"{KV_LAYOUT_METHOD}: expected a dict with protocol {EXTENSION_PROTOCOL}, got "
                f"{str(first)[:200]} (engine and sidecar run different slofleet versions?)"
            )
        try:
            return KVLayout(
                num_blocks=int(first["num_blocks"]),
                block_size_tokens=int(first["block_size_tokens"]),
                bytes_per_block=int(first["bytes_per_block"]),
                dtype=str(first["dtype"]),
                layout=str(first["layout"]),
                num_layers=int(first["num_layers"]),
                num_kv_heads=int(first["num_kv_heads"]),
                head_size=int(first["head_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{KV_LAYOUT_METHOD}: malformed result: {e}") from e

    async def info(self) -> EngineInfo:
        models, version, kv = await asyncio.gather(
            self._get_json("/v1/models"), self._get_json("/version"), self.kv_layout()
        )
        try:
            card = models["data"][0]
            return EngineInfo(
                model=str(card["id"]),
                engine_version=str(version["version"]),
                max_model_len_tokens=int(card.get("max_model_len") or 0),
                kv=kv,
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineError(f"GET {self.url}/v1/models or /version: unexpected payload: {e}") from e

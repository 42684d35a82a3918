"""The engine calls that memory commands need, over vLLM's dev-mode HTTP routes.

Every call opens and closes its own connection: a failed `/collective_rpc` leaves vLLM's
keep-alive connection broken (vllm-cpu-facts.md), and a memory command must not inherit that.
"""

from __future__ import annotations

from typing import Any

import aiohttp

LAYERS_PROTOCOL = 1


class EngineCallError(RuntimeError):
    """The engine did not answer as expected; the message names the route and the reason."""


class EngineControl:
    def __init__(self, url: str, *, timeout_seconds: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), timeout=self._timeout
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, verb: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            raise RuntimeError("EngineControl.start() was not awaited")
        try:
            async with self._session.request(verb, self.url + path, json=body) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineCallError(f"{verb} {self.url}{path}: HTTP {resp.status}: {text[:300]}")
                return await resp.json(content_type=None) if text else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise EngineCallError(f"{verb} {self.url}{path}: {type(e).__name__}: {e}") from e

    async def pause_keep(self) -> None:
        """Freeze the scheduler with requests kept (they continue on resume; new ones wait)."""
        await self._call("POST", "/pause?mode=keep&clear_cache=false")

    async def resume(self) -> None:
        await self._call("POST", "/resume")

    async def is_paused(self) -> bool:
        return bool((await self._call("GET", "/is_paused"))["is_paused"])

    async def sleep(self, level: int = 1) -> None:
        """GPU builds only (started with --enable-sleep-mode): offload weights, free KV. `wait`
        lets in-flight requests finish first, because level 1 discards the KV cache."""
        await self._call("POST", f"/sleep?level={level}&mode=wait")

    async def wake_up(self) -> None:
        await self._call("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        return bool((await self._call("GET", "/is_sleeping"))["is_sleeping"])

    async def rpc(self, method: str, *args: str, timeout_seconds: float = 280.0) -> dict[str, Any]:
        """Call a LayerDropExtension method on every worker; returns the first worker's dict and
        refuses results that disagree on success (tensor-parallel workers must all succeed)."""
        body = {"method": method, "args": list(args), "timeout": timeout_seconds}
        payload = await self._call("POST", "/collective_rpc", body)
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise EngineCallError(
                f"/collective_rpc {method}: expected one dict per worker, got {str(payload)[:300]} (is the "
                "engine started with --worker-extension-cls slofleet.sidecar.vllm_ext.worker."
                "SlofleetWorkerExtension and VLLM_SERVER_DEV_MODE=1?)"
            )
        if len({bool(r.get("ok")) for r in results}) != 1:
            raise EngineCallError(f"/collective_rpc {method}: workers disagree: {str(results)[:300]}")
        return results[0]

"""The migration service's two handles on its engine: the KV connector's control socket, and abort.

The connector (sidecar/vllm_ext/kv_connector.py) answers one JSON line per command on a Unix socket
in the pod (`layout`, `info`, `export`, `arm`, `disarm`, `final`, `stats`); a request is stopped
through the engine's own `POST /abort_requests` (dev mode), with the id the connector returns from
`arm`, so that the stop goes through vLLM's normal abort path and the client's stream ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from slofleet.sidecar.migration.segment import KVLayout


class EngineLinkError(RuntimeError):
    """The connector or the engine refused a command; `state` says what the request is doing."""

    def __init__(self, message: str, state: str = "error") -> None:
        super().__init__(message)
        self.state = state


class KVControl:
    def __init__(self, socket_path: str, engine_url: str) -> None:
        self.socket_path = socket_path
        self.engine_url = engine_url.rstrip("/")

    async def call(self, op: str, seconds: float = 30.0, **args: Any) -> dict[str, Any]:
        """One command on a fresh connection (commands block in the engine; they must not queue)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=1 << 24), seconds
            )
        except (OSError, TimeoutError) as e:
            raise EngineLinkError(
                f"KV connector control socket {self.socket_path}: {e} (is the engine running with "
                f"--kv-transfer-config naming SlofleetMigrationConnector and this control_socket?)",
                "engine_down",
            ) from e
        try:
            writer.write(json.dumps({"op": op, "timeout": seconds, **args}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), seconds + 5.0)
        except (OSError, TimeoutError) as e:
            raise EngineLinkError(f"KV connector {op}: {e}", "engine_down") from e
        finally:
            writer.close()
        if not line:
            raise EngineLinkError(f"KV connector closed the socket during {op}", "engine_down")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise EngineLinkError(f"KV connector {op}: {reply['error']}", str(reply.get("state", "error")))
        return reply

    async def layout(self) -> KVLayout:
        return KVLayout.from_json((await self.call("layout", seconds=10.0))["layout"])

    async def abort(self, abort_id: str) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.engine_url + "/abort_requests", json={"request_ids": [abort_id]}) as resp,
            ):
                if resp.status != 200:
                    raise EngineLinkError(
                        f"POST {self.engine_url}/abort_requests: HTTP {resp.status} (the engine needs "
                        f"VLLM_SERVER_DEV_MODE=1)",
                        "engine_down",
                    )
        except aiohttp.ClientError as e:
            raise EngineLinkError(f"POST {self.engine_url}/abort_requests: {e}", "engine_down") from e

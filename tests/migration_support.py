"""Engines with slofleet's KV connector, their Migration services, and a client that follows a move.

Shared by tests/test_migration_engine.py and bench/migration.py. The client plays the gateway's
part of the contract (gateway/relay.py owns it in production): it streams with
`return_token_ids`, and when the source's stream ends with finish_reason "abort" (or none) it asks the source
sidecar's `ResolveMigration` where to resume, then continues there with prompt = prompt ids +
tokens received, the remaining `max_tokens`, and the `kv_transfer_params` the resolution gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from prometheus_client import CollectorRegistry

from slofleet.api.v1 import migration_pb2 as pb
from slofleet.api.v1 import migration_pb2_grpc as pb_grpc
from slofleet.operator.render import kv_transfer_config_args
from slofleet.sidecar.migration.engine_link import EngineLinkError, KVControl
from slofleet.sidecar.migration.service import (
    GRPC_OPTIONS,
    MigrationMetrics,
    MigrationService,
    add_migration_service,
)
from tests.enginectl import VllmServer, free_port, start_vllm

# The engine arguments the product renders, so the tests load the connector exactly as pods do.
connector_args = kv_transfer_config_args


@dataclass
class Node:
    """One instance: engine + its Migration service (in this process, on its own gRPC port)."""

    name: str
    server: VllmServer
    control: KVControl
    service: MigrationService
    grpc_server: grpc.aio.Server
    grpc_addr: str
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return self.server.url

    def stub(self) -> pb_grpc.MigrationStub:
        return pb_grpc.MigrationStub(grpc.aio.insecure_channel(self.grpc_addr, options=GRPC_OPTIONS))


def start_engine(
    name: str,
    model: str | Path,
    engine_args: Sequence[str],
    max_model_len: int,
    env: Mapping[str, str] | None = None,
) -> tuple[VllmServer, str]:
    sock_dir = Path(tempfile.mkdtemp(prefix=f"slofleet-{name}-", dir="/dev/shm"))
    sock = str(sock_dir / "kv.sock")
    server = start_vllm(
        model, extra_args=[*connector_args(sock), *engine_args], max_model_len=max_model_len, env=env
    )
    return server, sock


async def start_node(name: str, server: VllmServer, sock: str, **service_args: object) -> Node:
    registry = CollectorRegistry()
    control = KVControl(sock, server.url)
    service = MigrationService(control, metrics=MigrationMetrics(registry), **service_args)  # type: ignore[arg-type]
    grpc_server = grpc.aio.server(options=GRPC_OPTIONS)
    add_migration_service(grpc_server, service)
    port = free_port()
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    await grpc_server.start()
    return Node(name, server, control, service, grpc_server, f"127.0.0.1:{port}", registry)


async def migrate(
    source: Node,
    target: Node | str,
    request_id: str,
    *,
    max_stages: int = 8,
    cutover_blocks: int = 2,
    target_instance: str | None = None,
) -> list[pb.MigrationProgress]:
    """MigrateOut on the source's sidecar, as the operator calls it; returns every progress message."""
    addr = target.grpc_addr if isinstance(target, Node) else target
    inst = target_instance or (target.name if isinstance(target, Node) else "gone")
    req = pb.MigrateOutRequest(
        request_id=request_id,
        target_sidecar=addr,
        target_instance=inst,
        max_stages=max_stages,
        cutover_blocks=cutover_blocks,
        timeout_seconds=120,
    )
    async with grpc.aio.insecure_channel(source.grpc_addr, options=GRPC_OPTIONS) as ch:
        return [p async for p in pb_grpc.MigrationStub(ch).MigrateOut(req)]


@dataclass
class Leg:
    url: str
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    kv_transfer_params: dict[str, object] | None = None


@dataclass
class StreamResult:
    tokens: list[int]
    finish_reason: str | None
    legs: list[Leg]

    def gaps(self) -> list[float]:
        """Client-visible downtime of each move: last token of one leg to first of the next."""
        out = []
        for a, b in zip(self.legs, self.legs[1:], strict=False):
            if a.last_token_at is not None and b.first_token_at is not None:
                out.append(b.first_token_at - a.last_token_at)
        return out


async def _stream(
    session: aiohttp.ClientSession,
    leg: Leg,
    body: dict[str, object],
    request_id: str,
) -> AsyncIterator[tuple[list[int], str | None]]:
    async with session.post(
        leg.url + "/v1/completions", json=body, headers={"X-Request-Id": request_id}
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{leg.url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices", []):
                toks = ch.get("token_ids") or []
                if toks:
                    now = time.perf_counter()
                    leg.first_token_at = leg.first_token_at or now
                    leg.last_token_at = now
                yield toks, ch.get("finish_reason")


async def generate_following_moves(
    session: aiohttp.ClientSession,
    nodes: dict[str, Node],
    first: Node,
    model: str,
    prompt: list[int],
    max_tokens: int,
    request_id: str,
    recompute_on: Node | None = None,
) -> StreamResult:
    """Greedy generation that continues wherever the source's sidecar says the request went.

    A stop that no migration explains resumes by recompute on `recompute_on` if given (the
    gateway's answer to a lost instance; the benchmark's baseline), else raises.
    """
    tokens: list[int] = []
    legs: list[Leg] = []
    node, kv_params, attempt = first, None, 0
    while True:
        leg = Leg(node.url, kv_transfer_params=kv_params)
        legs.append(leg)
        body: dict[str, object] = {
            "model": model,
            "prompt": prompt + tokens,
            "max_tokens": max_tokens - len(tokens),
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        if kv_params:
            body["kv_transfer_params"] = kv_params
        finish = None
        rid = request_id if attempt == 0 else f"{request_id}-m{attempt}"
        async for toks, reason in _stream(session, leg, body, rid):
            tokens += toks
            leg.tokens += toks
            finish = reason or finish
        # vLLM ends an aborted stream with finish_reason "abort": that is the cut-over signal.
        if finish not in (None, "abort"):
            return StreamResult(tokens, finish, legs)
        async with grpc.aio.insecure_channel(node.grpc_addr, options=GRPC_OPTIONS) as ch:
            res = await pb_grpc.MigrationStub(ch).ResolveMigration(
                pb.ResolveMigrationRequest(request_id=rid, wait_seconds=30)
            )
        if res.state == pb.ResolveMigrationReply.STATE_NONE:
            if recompute_on is None:
                raise RuntimeError(f"stream of {rid} on {node.name} ended without finish and no migration")
            node, kv_params, attempt = recompute_on, None, attempt + 1
            continue
        node = nodes[res.target_instance]
        kv_params = json.loads(res.kv_transfer_params_json) if res.kv_transfer_params_json else None
        attempt += 1


async def complete(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> list[int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    async with session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.json()
    return list(data["choices"][0]["token_ids"])


_SOURCE_RE = re.compile(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="([a-z_]+)"[^}]*\}\s+(\S+)$')


async def prompt_tokens_by_source(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SOURCE_RE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def wait_engine_tokens(
    node: Node, request_id: str, n: int, gen: asyncio.Task[Any], seconds: float = 300.0
) -> None:
    """Until the engine has generated `n` tokens of the request, as its KV connector counts them.

    The engine's count, not the client's: on a busy 2-core box a client can stall for seconds and
    then read a whole burst, so the client's count may say 100 while the engine is near the end.
    `gen` is the task streaming the request: if it ends first, its error (or result) is the answer.
    """
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        if gen.done():
            raise AssertionError(
                f"{request_id} ended before {n} tokens were seen on {node.name}: {gen.result()!r:.300}; "
                f"last info {last}"
            )
        try:
            info = await node.control.call("info", seconds=5.0, request_id=request_id)
        except EngineLinkError as e:
            last = e  # not admitted yet (or already gone: the caller's next step says so)
        else:
            last = info
            if info["num_tokens"] - info["num_prompt_tokens"] >= n:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{request_id}: {n} tokens not generated on {node.name} in {seconds} s; last {last}")


async def stop_node(node: Node) -> None:
    """Stop the Migration service and remove the control socket's folder (the engine goes next)."""
    with contextlib.suppress(Exception):
        await node.grpc_server.stop(0)
    shutil.rmtree(Path(node.control.socket_path).parent, ignore_errors=True)

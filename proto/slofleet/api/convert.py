"""Conversions between the core's types (slofleet.instance) and the v1 protobuf messages.

One copy for every runtime: the sidecar builds InstanceLoad messages, the gateway and the
operator read them. Imports protobuf only (no grpc), so any runtime may use it.
"""

from __future__ import annotations

from slofleet.api.v1 import sidecar_pb2 as pb
from slofleet.instance import InstanceLoad, Pool, RequestClass, RequestInfo

POOL_TO_PB = {Pool.INTERACTIVE: pb.POOL_INTERACTIVE, Pool.MIXED: pb.POOL_MIXED, Pool.BATCH: pb.POOL_BATCH}
POOL_FROM_PB = {v: k for k, v in POOL_TO_PB.items()}
CLASS_TO_PB = {
    RequestClass.INTERACTIVE: pb.REQUEST_CLASS_INTERACTIVE,
    RequestClass.BATCH: pb.REQUEST_CLASS_BATCH,
}
CLASS_FROM_PB = {v: k for k, v in CLASS_TO_PB.items()}


def request_to_pb(r: RequestInfo) -> pb.RequestInfo:
    return pb.RequestInfo(
        request_id=r.request_id,
        request_class=CLASS_TO_PB[r.request_class],
        priority=r.priority,
        prompt_tokens=r.prompt_tokens,
        max_tokens=r.max_tokens,
        generated_tokens=r.generated_tokens,
    )


def request_from_pb(r: pb.RequestInfo) -> RequestInfo:
    """Trusting conversion (messages from our own sidecar); servers validate input themselves."""
    return RequestInfo(
        request_id=r.request_id,
        request_class=CLASS_FROM_PB.get(r.request_class, RequestClass.INTERACTIVE),
        priority=r.priority,
        prompt_tokens=r.prompt_tokens,
        max_tokens=r.max_tokens,
        generated_tokens=r.generated_tokens,
    )


def load_to_pb(load: InstanceLoad, timestamp_unix_nanos: int) -> pb.InstanceLoad:
    return pb.InstanceLoad(
        instance_id=load.instance_id,
        timestamp_unix_nanos=timestamp_unix_nanos,
        healthy=load.healthy,
        draining=load.draining,
        pool=POOL_TO_PB[load.pool],
        running_requests=load.running_requests,
        waiting_requests=load.waiting_requests,
        kv_usage_fraction=load.kv_usage_fraction,
        kv_total_blocks=load.kv_total_blocks,
        kv_free_blocks=load.kv_free_blocks,
        block_size_tokens=load.block_size_tokens,
        concurrency_limit=load.concurrency_limit,
        prompt_tokens_per_second=load.prompt_tokens_per_second,
        generation_tokens_per_second=load.generation_tokens_per_second,
        preemptions_total=load.preemptions_total,
        ttft_p50_seconds=load.ttft_p50_seconds,
        ttft_p99_seconds=load.ttft_p99_seconds,
        itl_p50_seconds=load.itl_p50_seconds,
        itl_p99_seconds=load.itl_p99_seconds,
        freeness=load.freeness,
        layers_resident=load.layers_resident,
        layers_total=load.layers_total,
        requests=[request_to_pb(r) for r in load.requests],
    )


def load_from_pb(m: pb.InstanceLoad) -> InstanceLoad:
    return InstanceLoad(
        instance_id=m.instance_id,
        running_requests=m.running_requests,
        waiting_requests=m.waiting_requests,
        kv_usage_fraction=m.kv_usage_fraction,
        kv_total_blocks=m.kv_total_blocks,
        kv_free_blocks=m.kv_free_blocks,
        block_size_tokens=m.block_size_tokens,
        concurrency_limit=m.concurrency_limit,
        draining=m.draining,
        healthy=m.healthy,
        pool=POOL_FROM_PB.get(m.pool, Pool.MIXED),
        prompt_tokens_per_second=m.prompt_tokens_per_second,
        generation_tokens_per_second=m.generation_tokens_per_second,
        preemptions_total=m.preemptions_total,
        ttft_p50_seconds=m.ttft_p50_seconds,
        ttft_p99_seconds=m.ttft_p99_seconds,
        itl_p50_seconds=m.itl_p50_seconds,
        itl_p99_seconds=m.itl_p99_seconds,
        freeness=m.freeness,
        layers_resident=m.layers_resident,
        layers_total=m.layers_total,
        requests=tuple(request_from_pb(r) for r in m.requests),
    )

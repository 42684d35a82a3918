"""The local autoscaler in the sidecar (Chiron's lower level): the instance's concurrency limit.

Every `interval` it turns the last few seconds of engine samples into a `LocalObservation` and
asks the pure policy (slofleet.policies.local_autoscaler) for the next limit, which the gateway
honours through Load/WatchLoad. A limit set by SetLimits (operator, user) is where the policy
continues from: the controller reads the current limit from the state each step.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from slofleet.policies.local_autoscaler import (
    LocalAutoscalerConfig,
    LocalAutoscalerState,
    LocalObservation,
    next_limit,
)
from slofleet.sidecar.enginemetrics import EngineSample
from slofleet.sidecar.state import SidecarState
from slofleet.sidecar.window import SampleWindow

log = logging.getLogger("slofleet.sidecar.local_limit")


class LocalLimitController:
    def __init__(
        self,
        state: SidecarState,
        config: LocalAutoscalerConfig,
        interval_seconds: float = 1.0,
        window_seconds: float = 5.0,
    ) -> None:
        self.state = state
        self.config = config
        self.interval_seconds = interval_seconds
        # Short window: the policy reacts to the last few seconds, not the minute Load reports.
        self.window = SampleWindow(rate_seconds=window_seconds, latency_seconds=window_seconds)
        self.policy_state = LocalAutoscalerState.initial(config)
        self._next_step = 0.0
        self._last_preemptions: float | None = None
        state.set_limit(self.policy_state.limit)

    def observe(self, now: float, sample: EngineSample) -> None:
        self.window.add(now, sample)
        if now >= self._next_step:
            self._next_step = now + self.interval_seconds
            self.step(sample)

    def step(self, sample: EngineSample) -> None:
        stats = self.window.stats()
        preemptions = sample.preemptions_total
        new_preemptions = (
            0 if self._last_preemptions is None else max(0, preemptions - self._last_preemptions)
        )
        self._last_preemptions = preemptions
        obs = LocalObservation(
            ttft_p99_s=stats.ttft_p99_seconds,
            itl_p99_s=stats.request_itl_p99_seconds,
            throughput_tokens_per_s=stats.prompt_tokens_per_second + stats.generation_tokens_per_second,
            in_flight=sample.running_requests + sample.waiting_requests,
            kv_usage_fraction=sample.kv_usage_fraction,
            new_preemptions=int(new_preemptions),
        )
        current = replace(self.policy_state, limit=self.state.concurrency_limit)
        self.policy_state = next_limit(current, obs, self.config)
        if self.policy_state.limit != current.limit:
            log.info(
                "instance=%s event=local_limit from=%d to=%d reason=%s",
                self.state.instance_id, current.limit, self.policy_state.limit, self.policy_state.reason,
            )  # fmt: skip
            self.state.set_limit(self.policy_state.limit)

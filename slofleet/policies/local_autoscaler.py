"""Local autoscaler: one instance's concurrency limit from its own backpressure.

Why a limit at all: an engine accepts any number of requests, but past some concurrency each extra
request only adds latency (ITL grows with batch size and context) or triggers KV preemptions, while
throughput has stopped growing. The right limit depends on the model, the hardware and the current
mix of prompt/output lengths, so it is found online, like TCP's congestion window (Chiron's local
autoscaler): grow it while throughput still rises, cut it multiplicatively when the instance violates
its latency SLO or runs out of KV cache. A cut must earn the next one: when concurrency fell after a
cut and the violation did not, the latency is not coming from concurrency (a slow or stalled host, a
long-prompt mix) and further cuts would only throw throughput away, so the limit goes back to where
the episode began and latency is ignored for a while. The gateway honours the limit
(`InstanceLoad.has_room`), so excess load stays queued at the gateway, where the global autoscaler
sees it as backpressure.

Pure and deterministic: the sidecar (every second), the local fleet and the simulator call the same
`next_limit` with an observation they build from their own sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class LocalAutoscalerConfig:
    """Bounds and gains. `ttft_slo_s`/`itl_slo_s` come from the LLMService's interactive SLO."""

    min_limit: int = 1
    max_limit: int = 256
    initial_limit: int = 16
    ttft_slo_s: float = 1.0
    itl_slo_s: float = 0.1
    # Stop growing once latency reaches this fraction of the SLO: growth near the SLO buys
    # little throughput and a burst would push the instance over.
    slo_headroom: float = 0.8
    # KV usage at or above this counts as exhaustion (vLLM preempts shortly after).
    kv_high: float = 0.95
    decrease_factor: float = 0.85
    # Steps after a decrease in which latency cannot cause another one: the latency window still
    # holds the samples that caused the first (TCP reacts once per round trip for the same
    # reason). KV exhaustion is not held back: it is measured now, not over a window.
    decrease_cooldown_steps: int = 5
    # A cut counts as relieving the violation when the next violation (after the cooldown, with
    # in-flight requests down to the new limit) is at least this much smaller, relatively.
    min_relief: float = 0.1
    # Steps in which latency violations are ignored after a cut was shown not to relieve them.
    unrelieved_hold_steps: int = 20
    additive_step: int = 2
    # Relative throughput gain that counts as "still rising" after a limit increase.
    min_gain: float = 0.02
    # Below this fraction of the SLO a binding limit is probed upward even at flat throughput.
    probe_below: float = 0.5
    # The limit is "binding" when in-flight requests reach this fraction of it; growing a
    # limit that the demand does not reach tells nothing about the instance's capacity.
    binding_fraction: float = 0.7

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(
                f"min_limit={self.min_limit}, max_limit={self.max_limit}: need 1 <= min_limit <= max_limit"
            )
        if not 0.0 < self.decrease_factor < 1.0:
            raise ValueError(f"decrease_factor={self.decrease_factor}: must be in (0, 1)")
        if not 0.0 <= self.min_relief < 1.0:
            raise ValueError(f"min_relief={self.min_relief}: must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class LocalObservation:
    """What the instance measured over the last interval.

    Latencies are the interval's p99 over finished interactive requests (0 when none finished);
    `itl_p99_s` is over each request's mean ITL, the measure an ITL SLO is defined on (a per-token
    p99 would count one stalled step in a long answer as a violation); throughput is
    tokens (prompt + generated) per second over the interval; `new_preemptions` counts engine
    preemptions since the previous observation.
    """

    ttft_p99_s: float
    itl_p99_s: float
    throughput_tokens_per_s: float
    in_flight: int
    kv_usage_fraction: float
    new_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class LocalAutoscalerState:
    """The limit plus what the next decision needs to remember.

    `slow_start` doubles the limit until the first congestion signal (as in TCP); afterwards
    growth is additive. `last_throughput` is the throughput measured at the previous limit.
    While a latency episode is open, `episode_violation` is the violation (worst latency / SLO) at
    the last cut and `episode_start_limit` the limit before its first cut; `blind` counts the steps
    left in which latency is ignored because cutting did not relieve it.
    """

    limit: int
    slow_start: bool = True
    last_throughput: float = 0.0
    reason: str = "initial"
    cooldown: int = 0
    episode_violation: float = 0.0
    episode_start_limit: int = 0
    blind: int = 0

    @classmethod
    def initial(cls, config: LocalAutoscalerConfig) -> LocalAutoscalerState:
        return cls(limit=max(config.min_limit, min(config.max_limit, config.initial_limit)))


def next_limit(
    state: LocalAutoscalerState, obs: LocalObservation, config: LocalAutoscalerConfig
) -> LocalAutoscalerState:
    """One control step: the new limit (always within [min_limit, max_limit]) and its reason."""
    itl_ratio = obs.itl_p99_s / config.itl_slo_s if config.itl_slo_s > 0 else 0.0
    ttft_ratio = obs.ttft_p99_s / config.ttft_slo_s if config.ttft_slo_s > 0 else 0.0
    worst = max(itl_ratio, ttft_ratio)
    kv_exhausted = obs.new_preemptions > 0 or obs.kv_usage_fraction >= config.kv_high

    def bounded(value: int) -> int:
        return max(config.min_limit, min(config.max_limit, value))

    cooldown = max(0, state.cooldown - 1)
    blind = max(0, state.blind - 1)
    violated = worst > 1.0
    if violated and not kv_exhausted:
        if cooldown > 0:
            reason = "hold: slo violated, recent decrease still settling"
            return replace(state, cooldown=cooldown, blind=blind, reason=reason)
        if blind > 0:
            return replace(state, blind=blind, reason="hold: slo violated, but not by concurrency")
        cut_took_effect = obs.in_flight <= state.limit
        if (
            state.episode_violation > 0.0
            and cut_took_effect
            and worst >= state.episode_violation * (1.0 - config.min_relief)
        ):
            restored = bounded(max(state.limit, state.episode_start_limit))
            return LocalAutoscalerState(
                restored,
                False,
                obs.throughput_tokens_per_s,
                f"restore: cutting to {state.limit} did not relieve the violation "
                f"({state.episode_violation:.2f}x slo before, {worst:.2f}x after)",
                blind=config.unrelieved_hold_steps,
            )
    if violated or kv_exhausted:
        # Decrease from what is actually in flight when that is lower: a limit above the real
        # concurrency would take several steps to bite.
        base = min(state.limit, max(obs.in_flight, config.min_limit))
        new = bounded(math.floor(base * config.decrease_factor))
        why = (
            f"kv exhausted (usage {obs.kv_usage_fraction:.2f}, {obs.new_preemptions} preemptions)"
            if kv_exhausted
            else f"slo violated (ttft p99 {obs.ttft_p99_s:.3f}s, itl p99 {obs.itl_p99_s:.3f}s)"
        )
        episode_open = state.episode_violation > 0.0
        return LocalAutoscalerState(
            new,
            False,
            obs.throughput_tokens_per_s,
            f"decrease: {why}",
            config.decrease_cooldown_steps,
            episode_violation=worst if violated else 0.0,
            episode_start_limit=state.episode_start_limit if episode_open else state.limit,
            blind=blind,
        )
    if worst > 0.0:  # latency measured and within the SLO: the episode, if any, was relieved
        state = replace(state, episode_violation=0.0, episode_start_limit=0)
    state = replace(state, blind=blind)
    binding = obs.in_flight >= config.binding_fraction * state.limit
    if not binding:
        return replace(state, cooldown=cooldown, reason="hold: limit not reached by demand")
    if worst >= config.slo_headroom:
        return replace(
            state,
            last_throughput=obs.throughput_tokens_per_s,
            cooldown=cooldown,
            reason="hold: latency near slo",
        )
    rising = obs.throughput_tokens_per_s > state.last_throughput * (1.0 + config.min_gain)
    if rising:
        grown = state.limit * 2 if state.slow_start else state.limit + config.additive_step
        return replace(
            state,
            limit=bounded(grown),
            last_throughput=obs.throughput_tokens_per_s,
            reason="increase: throughput still rising" + (" (slow start)" if state.slow_start else ""),
            cooldown=cooldown,
        )
    if worst < config.probe_below:
        # Flat throughput at a binding limit can mean the demand is flat, not the instance
        # saturated; with latency far from the SLO an additive probe is cheap and is how the limit
        # comes to measure capacity (the global autoscaler reads it as such).
        return replace(
            state,
            limit=bounded(state.limit + config.additive_step),
            slow_start=False,
            last_throughput=obs.throughput_tokens_per_s,
            reason="increase: probing, latency far below slo",
            cooldown=cooldown,
        )
    return replace(
        state,
        slow_start=False,
        last_throughput=obs.throughput_tokens_per_s,
        reason="hold: throughput stopped rising",
        cooldown=cooldown,
    )

"""The discrete-event fleet simulator.

Instance model (why it is fast): between two events of an instance its batch does not change, so
each iteration takes the same time `calibration.step_s(tokens, context)` and every running request
gains one token per iteration. The instance therefore keeps a *step counter*; a request that starts
decoding at step s0 with n tokens to go finishes at step s0 + n, and a heap of finish steps gives
the next completion in O(log n). Prefill runs chunked alongside the decodes (vLLM's chunked
prefill): each iteration takes up to `max_batched_tokens - running` prompt tokens of the request at
the head of the engine queue. KV use is prompt + generated tokens of the running requests (plus the
prompt being prefilled); when decoding would overflow the capacity, the engine preempts its newest
request (vLLM's recompute preemption) and re-prefills it later with its generated tokens. Events
are re-planned at each change and at every local tick, so the growth of context within an interval
is the only approximation.

Fleet model: a gateway queue per class (interactive FIFO, batch earliest-deadline-first), dispatch
by the injected dispatch function (default: `slofleet.policies.dispatch.choose`, the gateway's own
policy), the local autoscaler every `local_interval_s` when the policy uses it, the global
autoscaler every `control_interval_s`, cold starts from the calibration, and drain before removal
(batch work is pushed back to the queue with its generated tokens, as the gateway's resume path
does; queued interactive work is re-dispatched).

Live migration (Llumnix, `SimConfig.migration`): the rescheduler's policy runs at every *control*
tick, because that is where the runtime runs it (the control loop's step, operator and `slofleet
up` alike, plans with `plan_migrations` on the sidecars' Load before it applies a scale decision);
a scale-in victim is drained by migrating its running requests out at once, as the loop's drain
does, and leaves the fleet when empty. Each migration is enacted with `slofleet.sim.migration`'s
costs: the destination reserves the request's KV while it keeps decoding on the source, then the
request pauses for the downtime and resumes there with its context.

Every policy decision goes through the same pure functions the runtimes call; the simulator only
builds their inputs (`InstanceLoad`, `FleetObservation`, `LocalObservation`) from its state.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from slofleet.calibration import EngineCalibration
from slofleet.instance import InstanceLoad, Pool, RequestClass, RequestInfo
from slofleet.policies import dispatch as dispatch_policy
from slofleet.policies.freeness import compute_freeness
from slofleet.policies.global_autoscaler import Autoscaler, BatchGroup, FleetObservation, ScaleDecision
from slofleet.policies.local_autoscaler import (
    LocalAutoscalerConfig,
    LocalAutoscalerState,
    LocalObservation,
    next_limit,
)
from slofleet.policies.memory_planner import MemberView, PlannerState
from slofleet.policies.memory_planner import plan as plan_memory
from slofleet.policies.migration import Migration, MigrationConfig, Reason, plan_migrations
from slofleet.policies.preemption import choose_preemption_instance, select_batch_evictions
from slofleet.sim.dispatch_index import FreenessIndex
from slofleet.sim.kunserve import (
    KunServeConfig,
    check_calibration,
    drop_seconds,
    member_calibration,
    restore_seconds,
)
from slofleet.sim.migration import MigrationCosts, Outcome
from slofleet.sim.traces import Trace
from slofleet.sim.workload import BatchJob

DispatchFn = Callable[[Sequence[InstanceLoad], RequestInfo], str | None]
"""(eligible instance loads, request) -> chosen instance id, or None when none has room."""

_EPS = 1e-6
INTERACTIVE, BATCH = 0, 1
# Event kinds: an engine event, an instance ready after its cold start, a member entering or
# leaving a pipeline group (its `version` field carries the new group size), a migration's cut-over
# and its resume on the destination (their `idx` is the request id, `version` the migration's).
ENGINE, READY, REGROUP, CUTOVER, RESUME = 0, 1, 2, 3, 4
_DISPATCH_PARAMS = dispatch_policy.DispatchParams()


def gateway_dispatch(loads: Sequence[InstanceLoad], request: RequestInfo) -> str | None:
    """The gateway's dispatch policy (Llumnix freeness, `slofleet.policies.dispatch.choose`)."""
    req = dispatch_policy.DispatchRequest(
        prompt_tokens=request.prompt_tokens + request.generated_tokens,
        max_tokens=max(request.max_tokens - request.generated_tokens, 1),
        priority=request.priority,
        request_class=request.request_class,
    )
    return dispatch_policy.choose(loads, req, _DISPATCH_PARAMS).instance_id


@dataclass(frozen=True)
class SloSpec:
    ttft_s: float = 1.0
    itl_s: float = 0.1


@dataclass(frozen=True)
class SimConfig:
    calibration: EngineCalibration
    slo: SloSpec = field(default_factory=SloSpec)
    initial_replicas: dict[Pool, int] = field(default_factory=lambda: {Pool.MIXED: 1})
    control_interval_s: float = 5.0
    local_interval_s: float = 1.0
    # latency percentiles fed to the local autoscaler cover this much recent time
    local_window_s: float = 5.0
    sample_interval_s: float = 10.0
    attainment_window_s: float = 60.0
    local_autoscaler: LocalAutoscalerConfig | None = None
    dispatch: DispatchFn = gateway_dispatch
    # With the gateway's freeness dispatch, answer it from an incremental index
    # (`slofleet.sim.dispatch_index`, same decisions) instead of scoring every instance per
    # request; False scores the whole fleet through `dispatch.choose` (the reference).
    dispatch_index: bool = True
    # Without a local autoscaler the gateway forwards up to this many times max_num_seqs to an
    # instance and the engine queues the rest (vLLM accepts everything; this only bounds memory).
    unmanaged_limit_factor: int = 4
    # Simulated time is at least this long (GPU-hours are counted up to it for every policy).
    horizon_s: float = 0.0
    # Give up on work still unfinished this long after the horizon (counted as missed).
    max_overrun_s: float = 7200.0
    # KunServe's parameter drop and pipeline mode (`slofleet.sim.kunserve`): the memory planner
    # runs at every local tick over the instances' engine queues. None: off.
    kunserve: KunServeConfig | None = None
    # Llumnix live migration: the rescheduler's policy at every control tick, and drain by
    # migration before a scale-in. None: off (a victim's work is evicted or finishes in place).
    migration: MigrationConfig | None = None
    migration_costs: MigrationCosts = field(default_factory=MigrationCosts)


class Req:
    __slots__ = (
        "admit_t", "arrival", "cls", "ctx0", "deadline", "done", "evictions", "finish_step",
        "first_token", "inst", "job", "output", "prompt", "rid", "s0",
    )  # fmt: skip

    def __init__(
        self, rid: int, cls: int, arrival: float, prompt: int, output: int, job: int, deadline: float
    ):
        self.rid = rid
        self.cls = cls
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.job = job
        self.deadline = deadline
        self.done = 0
        self.first_token = -1.0
        self.admit_t = 0.0
        self.inst: Inst | None = None
        self.s0 = 0.0
        self.ctx0 = 0
        self.finish_step = 0.0
        self.evictions = 0

    def info(self, generated: int | None = None) -> RequestInfo:
        """As the gateway reports it; `generated`: output tokens so far, when known better than
        `done` (which a running request updates only when it stops)."""
        return RequestInfo(
            request_id=str(self.rid),
            request_class=RequestClass.BATCH if self.cls == BATCH else RequestClass.INTERACTIVE,
            priority=self.cls,
            prompt_tokens=self.prompt,
            max_tokens=self.output,
            generated_tokens=self.done if generated is None else generated,
        )


class Inst:
    """One simulated engine instance (see the module docstring for the model)."""

    def __init__(self, sim: Simulator, idx: int, pool: Pool, t: float, ready_at: float, limit: int):
        self.sim = sim
        self.cal = sim.cal
        self.idx = idx
        self.iid = f"{pool.value}-{idx}"
        self.pool = pool
        self.start_t = t
        self.ready_at = ready_at
        self.stop_t = -1.0
        self.ready = False
        self.draining = False
        self.limit = limit
        self.group_size = 1  # > 1 while a member of a KunServe pipeline group (its own `cal` then)
        self.local_state: LocalAutoscalerState | None = None
        self.eq_i: deque[Req] = deque()
        self.eq_b: deque[Req] = deque()
        self.pf: Req | None = None
        self.pf_left = 0.0
        self.pf_ctx = 0
        # KV tokens held for requests migrating in (reserved at the copy's start)
        self.reserved = 0
        self.run: dict[int, Req] = {}
        self.heap: list[tuple[float, int]] = []
        self.steps = 0.0
        self.t_last = t
        self.dt = self.cal.step_s(0, 0)
        self.chunk = 0.0
        self.sum_ctx0 = 0
        self.sum_s0 = 0.0
        self.version = 0
        self.n_batch = 0
        # requests assigned here (running + prefilling + engine-queued), kept as a counter
        # because dispatch reads it for every instance on every request
        self.in_flight = 0
        self.tokens = 0.0
        self.gen_tokens = 0.0
        self.preemptions = 0
        self.win_ttft: list[float] = []
        self.win_itl: list[float] = []
        # latencies of the last few local intervals: the sidecar reads vLLM's histograms over a
        # sliding window, so one slow second does not make the whole signal
        self.hist_ttft: deque[list[float]] = deque()
        self.hist_itl: deque[list[float]] = deque()
        self.last_tokens = 0.0
        self.last_gen = 0.0
        self.last_preemptions = 0
        self.snapshot: InstanceLoad | None = None
        # per request class: this instance changed since that class's dispatch index last read it
        self.dirty = [False, False]

    def touch(self) -> None:
        """The state changed: drop the cached snapshot and have the dispatch indexes re-read it
        (each index lazily, at its next dispatch: an index that serves no request does no work)."""
        self.snapshot = None
        dirty = self.dirty
        if not dirty[INTERACTIVE]:
            dirty[INTERACTIVE] = True
            self.sim.dirty[INTERACTIVE].append(self)
        if not dirty[BATCH]:
            dirty[BATCH] = True
            self.sim.dirty[BATCH].append(self)

    # ---- state -------------------------------------------------------------------------------
    def kv_used(self) -> float:
        return self.sum_ctx0 + len(self.run) * self.steps - self.sum_s0 + self.pf_ctx + self.reserved

    def load(self) -> InstanceLoad:
        """This instance as the sidecar would report it (cached until the state changes)."""
        if self.snapshot is None:
            cal = self.cal
            total = cal.kv_capacity_tokens // cal.block_size_tokens
            used = min(total, math.ceil(self.kv_used() / cal.block_size_tokens))
            running = len(self.run) + (1 if self.pf is not None else 0)
            fr = compute_freeness(
                total_blocks=total,
                used_blocks=used,
                running_requests=running,
                block_size_tokens=cal.block_size_tokens,
                draining=self.draining,
            ).freeness
            self.snapshot = InstanceLoad(
                instance_id=self.iid,
                running_requests=running,
                waiting_requests=len(self.eq_i) + len(self.eq_b),
                kv_usage_fraction=used / total,
                kv_total_blocks=total,
                kv_free_blocks=total - used,
                block_size_tokens=cal.block_size_tokens,
                concurrency_limit=self.limit,
                draining=self.draining,
                pool=self.pool,
                generation_tokens_per_second=self.sim.gen_rate.get(self.idx, 0.0),
                preemptions_total=self.preemptions,
                freeness=fr,
            )
        return self.snapshot

    def full_load(self, with_requests: bool = False) -> InstanceLoad:
        """`load()` with Llumnix freeness over the requests here (the head of the engine queue
        counts), as the sidecar reports it to the control loop; built only at control ticks
        because it walks every request.

        `with_requests`: also list the requests, with the tokens the running ones generated so far
        (the rescheduler chooses among them and sizes their copy). Without it the autoscalers' view
        stays as it always was: running requests carry the tokens they had when they started."""
        base = self.load()
        ordered = [*self.run.values(), *([self.pf] if self.pf is not None else []), *self.eq_i, *self.eq_b]
        if with_requests:
            infos = [r.info(self.generated(r)) for r in ordered]
        else:
            infos = [r.info() for r in ordered]
        fr = compute_freeness(
            total_blocks=base.kv_total_blocks,
            used_blocks=base.kv_total_blocks - base.kv_free_blocks,
            running_requests=base.running_requests,
            block_size_tokens=base.block_size_tokens,
            requests=infos,
            draining=self.draining,
        ).freeness
        return replace(base, freeness=fr, requests=tuple(infos) if with_requests else ())

    def start_decoding(self, r: Req) -> None:
        """`r` joins the decode batch with its context (`prompt + done` tokens of KV here)."""
        r.s0 = self.steps
        r.ctx0 = r.prompt + r.done
        r.finish_step = self.steps + (r.output - r.done)
        self.run[r.rid] = r
        self.sum_ctx0 += r.ctx0
        self.sum_s0 += r.s0
        heapq.heappush(self.heap, (r.finish_step, r.rid))

    def generated(self, r: Req) -> int:
        """Output tokens `r` holds now (whole iterations only: a partial one is lost on a move)."""
        if self.run.get(r.rid) is r:
            return min(r.output - 1, r.done + int(self.steps - r.s0))
        return r.done

    # ---- time ------------------------------------------------------------------------------
    def advance(self, t: float) -> None:
        if t <= self.t_last:
            return
        ds = (t - self.t_last) / self.dt
        n = len(self.run)
        self.steps += ds
        self.gen_tokens += n * ds
        self.tokens += n * ds
        if self.pf is not None:
            d = min(ds * self.chunk, self.pf_left)
            self.pf_left -= d
            self.tokens += d
        self.t_last = t
        self.touch()

    def plan(self) -> None:
        """Schedule this instance's next event from its current (constant) rates."""
        self.version += 1
        self.touch()
        run = self.run
        heap = self.heap
        while heap:
            fs, rid = heap[0]
            head = run.get(rid)
            if head is not None and head.finish_step == fs:
                break
            heapq.heappop(heap)
        n = len(run)
        cal = self.cal
        steps = self.steps
        pf = self.pf
        if pf is not None:
            # Full chunks until the last one, which carries only what is left of the prompt.
            chunk = min(max(1.0, float(cal.max_batched_tokens - n)), max(self.pf_left, _EPS))
        else:
            chunk = 0.0
        self.chunk = chunk
        ctx = self.sum_ctx0 + n * steps - self.sum_s0
        # `cal.step_s(n + chunk, ctx, n)` inlined (the hottest call; same arithmetic, same order)
        dt = (
            cal.overhead_s
            + max(cal.weight_read_s, (n + chunk) * cal.per_token_compute_s)
            + ctx * cal.per_ctx_token_s
            + n * cal.per_seq_s
        )
        self.dt = dt
        best = math.inf
        if pf is not None:
            best = max(1.0, math.floor(self.pf_left / chunk + _EPS))
        if heap:
            best = min(best, heap[0][0] - steps)
        if n:
            best = min(best, (cal.kv_capacity_tokens - (ctx + self.pf_ctx + self.reserved)) / n)
        if best < math.inf:
            sim = self.sim
            sim.seq += 1
            t_next = self.t_last + max(best, 0.0) * dt
            heapq.heappush(sim.events, (t_next, sim.seq, ENGINE, self.idx, self.version))

    # ---- engine actions ----------------------------------------------------------------------
    def on_event(self, t: float) -> None:
        self.advance(t)
        sim = self.sim
        if self.pf is not None and self.pf_left <= 1e-3:
            r = self.pf
            self.pf = None
            self.pf_ctx = 0
            self.pf_left = 0.0
            if r.first_token < 0:
                r.first_token = t
                if r.cls == INTERACTIVE:
                    self.win_ttft.append(t - r.admit_t)
            r.done += 1
            if r.done >= r.output:
                sim.complete(r, self, t)
            else:
                self.start_decoding(r)
        heap, run = self.heap, self.run
        limit = self.steps + _EPS
        while heap and heap[0][0] <= limit:
            fs, rid = heapq.heappop(heap)
            r2 = run.get(rid)
            if r2 is None or r2.finish_step != fs:
                continue
            self._remove_running(r2)
            r2.done = r2.output
            sim.complete(r2, self, t)
        if run and self.kv_used() >= self.cal.kv_capacity_tokens - 0.5:
            self._preempt_newest()
        self.try_start()
        self.plan()
        sim.after_change(self, t)

    def _remove_running(self, r: Req) -> None:
        del self.run[r.rid]
        self.sum_ctx0 -= r.ctx0
        self.sum_s0 -= r.s0

    def _preempt_newest(self) -> None:
        # vLLM preempts the lowest-priority, most recently scheduled request (batch first).
        victim = max(self.run.values(), key=lambda r: (r.cls, r.s0, r.rid))
        victim.done = min(victim.output - 1, victim.done + int(self.steps - victim.s0))
        self._remove_running(victim)
        (self.eq_b if victim.cls == BATCH else self.eq_i).appendleft(victim)
        self.preemptions += 1

    def try_start(self) -> None:
        """Start prefilling the head of the engine queue (interactive first) if KV and
        max_num_seqs allow; an interactive head preempts running batch work to get them
        (vLLM's `--scheduling-policy priority`)."""
        if self.pf is not None:
            return
        q = self.eq_i or self.eq_b
        if not q:
            return
        r = q[0]
        need = r.prompt + r.done
        cap = self.cal.kv_capacity_tokens
        max_seqs = self.cal.max_num_seqs
        run = self.run
        while (len(run) >= max_seqs or (self.kv_used() + need > cap and run)) and (
            q is self.eq_i and any(x.cls == BATCH for x in run.values())
        ):
            self._preempt_newest()
        if len(run) >= max_seqs or (run and self.kv_used() + need > cap):
            return
        q.popleft()
        self.pf = r
        self.pf_left = float(need)
        self.pf_ctx = need

    def admit(self, r: Req, t: float) -> None:
        self.advance(t)
        r.inst = self
        r.admit_t = t
        self.in_flight += 1
        if r.cls == BATCH:
            self.eq_b.append(r)
            self.n_batch += 1
        else:
            self.eq_i.append(r)
        self.try_start()
        self.plan()

    def evict(self, r: Req, t: float) -> None:
        """Take `r` off this instance keeping its generated tokens (gateway resume path)."""
        self.advance(t)
        if self.pf is r:
            self.pf = None
            self.pf_ctx = 0
            self.pf_left = 0.0
        elif r.rid in self.run:
            r.done = min(r.output - 1, r.done + int(self.steps - r.s0))
            self._remove_running(r)
        else:
            (self.eq_b if r.cls == BATCH else self.eq_i).remove(r)
        if r.cls == BATCH:
            self.n_batch -= 1
        self.in_flight -= 1
        r.inst = None
        r.evictions += 1
        self.try_start()
        self.plan()

    def requests(self) -> list[Req]:
        out = list(self.run.values())
        if self.pf is not None:
            out.append(self.pf)
        out.extend(self.eq_i)
        out.extend(self.eq_b)
        return out


@dataclass(slots=True)
class _Move:
    """One migration in progress (`tokens`: KV the destination holds for it)."""

    mid: int
    req: Req
    src: Inst
    dst: Inst
    reason: Reason
    tokens: int


@dataclass
class SimResult:
    policy: str
    duration_s: float
    gpu_hours: float
    interactive_total: int
    interactive_met: int
    ttft: np.ndarray
    itl: np.ndarray
    batch_total: int
    batch_on_time: int
    batch_unfinished: int
    scale_events: list[tuple[float, str, int, int, str]]
    migrations: int
    evictions: int
    preemptions: int
    peak_replicas: int
    samples: dict[str, list[float]]
    mean_e2e_s: float = 0.0
    wall_s: float = 0.0
    groups_formed: int = 0  # KunServe pipeline groups formed (drops) and split (restores)
    groups_split: int = 0
    # Planned migrations by how they ended (`sim.migration.Outcome`), and the completed ones (the
    # `migrations` count) by the policy's reason.
    migrations_by_outcome: dict[str, int] = field(default_factory=dict)
    migrations_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def interactive_attainment(self) -> float:
        return self.interactive_met / self.interactive_total if self.interactive_total else 1.0

    @property
    def batch_on_time_fraction(self) -> float:
        return self.batch_on_time / self.batch_total if self.batch_total else 1.0


class Simulator:
    def __init__(
        self, trace: Trace, jobs: Sequence[BatchJob], autoscaler: Autoscaler, config: SimConfig
    ) -> None:
        self.trace = trace
        self.jobs = sorted(jobs, key=lambda j: j.submit_s)
        self.policy = autoscaler
        self.cfg = config
        self.cal = config.calibration
        self.local_cfg = config.local_autoscaler or LocalAutoscalerConfig(
            ttft_slo_s=config.slo.ttft_s, itl_slo_s=config.slo.itl_s, max_limit=self.cal.max_num_seqs
        )
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.instances: list[Inst] = []
        self.live: list[Inst] = []
        self.giq: deque[Req] = deque()
        self.gbq: list[tuple[float, int, Req]] = []
        self.gen_rate: dict[int, float] = {}
        self.dirty: tuple[list[Inst], list[Inst]] = ([], [])
        self.use_index = config.dispatch_index and config.dispatch is gateway_dispatch
        self.index = {INTERACTIVE: FreenessIndex(), BATCH: FreenessIndex()}
        self.block_size = max(self.cal.block_size_tokens, 1)
        self.local_window_ticks = max(1, round(config.local_window_s / config.local_interval_s))
        self.interactive_pools = {Pool.INTERACTIVE, Pool.MIXED}
        self.batch_pools = {Pool.BATCH, Pool.MIXED}
        # results
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.e2e_sum = 0.0
        self.int_met = 0
        self.int_total = 0
        self.batch_total = sum(len(j) for j in self.jobs)
        self.batch_on_time = 0
        self.batch_done = 0
        self.int_in_flight = 0
        self.batch_in_flight = 0
        self.job_queued = [0] * len(self.jobs)
        self.job_in_flight = [0] * len(self.jobs)
        self.window: deque[tuple[float, int]] = deque()
        self.window_met = 0
        self.scale_events: list[tuple[float, str, int, int, str]] = []
        self.evictions = 0
        self.migrations = 0
        self.migrations_by_outcome: dict[str, int] = {}
        self.migrations_by_reason: dict[str, int] = {}
        # migrations in progress, by request id
        self.moves: dict[int, _Move] = {}
        self.groups_formed = 0
        self.groups_split = 0
        self.planner_state = PlannerState()
        if config.kunserve is not None:
            check_calibration(self.cal)
        self.samples: dict[str, list[float]] = {
            k: []
            for k in (
                "t", "interactive_rps", "batch_rps", "interactive", "mixed", "batch", "ready",
                "attainment", "batch_queue", "interactive_queue", "grouped",
            )
        }  # fmt: skip
        self._arrivals_since_sample = [0, 0]
        self._win_total_since_sample = [0, 0]

    # ---- event plumbing ----------------------------------------------------------------------
    def push(self, t: float, kind: int, idx: int, version: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, idx, version))

    def launch(self, pool: Pool, t: float, ready: bool = False) -> Inst:
        limit = (
            LocalAutoscalerState.initial(self.local_cfg).limit
            if self.policy.uses_local_autoscaler
            else self.cfg.unmanaged_limit_factor * self.cal.max_num_seqs
        )
        inst = Inst(self, len(self.instances), pool, t, t if ready else t + self.cal.cold_start_s, limit)
        if self.policy.uses_local_autoscaler:
            inst.local_state = LocalAutoscalerState.initial(self.local_cfg)
        self.instances.append(inst)
        self.live.append(inst)
        inst.touch()
        if ready:
            inst.ready = True
        else:
            self.push(inst.ready_at, READY, inst.idx, 0)
        return inst

    def stop(self, inst: Inst, t: float) -> None:
        inst.stop_t = t
        inst.ready = False
        inst.touch()
        self.live.remove(inst)

    # ---- gateway -----------------------------------------------------------------------------
    def _candidates(self, r: Req) -> list[InstanceLoad]:
        """Loads of the instances that may take `r` (the gateway's view of the fleet)."""
        pools = self.interactive_pools if r.cls == INTERACTIVE else self.batch_pools
        return [i.load() for i in self.live if i.ready and not i.draining and i.pool in pools]

    def _reindex(self, cls: int) -> None:
        """Feed every instance changed since this class's last dispatch to its dispatch index
        (the hot path of a big fleet: unchanged entries are skipped before calling the index)."""
        bs = self.cal.block_size_tokens
        index = self.index[cls]
        live = index.live
        update = index.update
        if cls == INTERACTIVE:
            pools, reserve = self.interactive_pools, 0
        else:
            pools, reserve = self.batch_pools, _DISPATCH_PARAMS.batch_reserve_slots
        dirty = self.dirty[cls]
        for i in dirty:
            i.dirty[cls] = False
            n = i.in_flight
            slot = i.idx
            if i.ready and not i.draining and i.stop_t < 0 and i.pool in pools and n < i.limit - reserve:
                kv = i.sum_ctx0 + len(i.run) * i.steps - i.sum_s0 + i.pf_ctx + i.reserved
                total = i.cal.kv_capacity_tokens // bs  # a pipeline member's is larger
                free = total - max(min(total, math.ceil(kv / bs)), 0)
                if live.get(slot) != (free, i.iid, n):
                    update(slot, i.iid, free, n, True)
            elif slot in live:
                update(slot, i.iid, 0, n, False)
        dirty.clear()

    def _dispatch(self, r: Req, t: float) -> bool:
        if self.use_index:
            cls = r.cls
            if self.dirty[cls]:
                self._reindex(cls)
            # dispatch.blocks_for, inlined (hot): whole blocks of prompt + what is left to generate
            demand = -(-max(0, r.prompt + r.done + max(r.output - r.done, 1)) // self.block_size)
            slot = self.index[cls].best(demand)
            if slot is None:
                return cls == INTERACTIVE and self._burst(r, t)
            self._admit(r, self.instances[slot], t)
            return True
        cands = self._candidates(r)
        if not cands:
            return False
        chosen = self.cfg.dispatch(cands, r.info())
        if chosen is None:
            return False
        inst = self.instances[int(chosen.rsplit("-", 1)[1])]
        self._admit(r, inst, t)
        return True

    def _burst(self, r: Req, t: float) -> bool:
        """The indexed path's copy of `dispatch.choose`'s interactive overflow: every instance is
        at its limit, so `burst_pick` chooses among the same instances `_candidates` lists."""
        factor = _DISPATCH_PARAMS.burst_factor
        if factor <= 1.0:
            return False
        pools = self.interactive_pools
        by_id = {i.iid: i for i in self.live if i.ready and not i.draining and i.pool in pools}
        chosen = dispatch_policy.burst_pick(((i.iid, i.in_flight, i.limit) for i in by_id.values()), factor)
        if chosen is None:
            return False
        self._admit(r, by_id[chosen], t)
        return True

    def _admit(self, r: Req, inst: Inst, t: float) -> None:
        if r.cls == BATCH:
            self.job_queued[r.job] -= 1
            self.job_in_flight[r.job] += 1
            self.batch_in_flight += 1
        else:
            self.int_in_flight += 1
        inst.admit(r, t)

    def _preempt_for(self, r: Req, t: float) -> bool:
        """Interactive arrival, no room: evict batch work from a mixed instance (Chiron)."""
        mixed = [i for i in self.live if i.ready and not i.draining and i.pool == Pool.MIXED and i.n_batch]
        if not mixed:
            return False
        by_id = {i.iid: i for i in mixed}
        loads = []
        for i in mixed:
            base = i.load()
            reqs = tuple(q.info() for q in i.requests() if q.cls == BATCH)
            loads.append(
                InstanceLoad(
                    instance_id=base.instance_id,
                    running_requests=base.running_requests,
                    waiting_requests=base.waiting_requests,
                    kv_usage_fraction=base.kv_usage_fraction,
                    kv_total_blocks=base.kv_total_blocks,
                    kv_free_blocks=base.kv_free_blocks,
                    block_size_tokens=base.block_size_tokens,
                    concurrency_limit=base.concurrency_limit,
                    pool=base.pool,
                    requests=reqs,
                )
            )
        target_id = choose_preemption_instance(loads)
        if target_id is None:
            return False
        inst = by_id[target_id]
        batch_reqs = [q for q in inst.requests() if q.cls == BATCH]
        started = {str(q.rid): (q is inst.pf or q.rid in inst.run) for q in batch_reqs}
        need = inst.in_flight - inst.limit + 1
        victims = set(select_batch_evictions([q.info() for q in batch_reqs], need, started))
        for q in batch_reqs:
            if str(q.rid) in victims:
                self._evict(q, inst, t)
        if inst.in_flight >= inst.limit:
            return False
        self._admit(r, inst, t)
        return True

    def _evict(self, q: Req, inst: Inst, t: float) -> None:
        inst.evict(q, t)
        self.evictions += 1
        if q.cls == BATCH:
            self.batch_in_flight -= 1
            self.job_in_flight[q.job] -= 1
            self.job_queued[q.job] += 1
            self.seq += 1
            heapq.heappush(self.gbq, (q.deadline, self.seq, q))
        else:
            self.int_in_flight -= 1
            self.giq.appendleft(q)

    def release(self, t: float) -> None:
        """Send queued work to instances with room: interactive first, then batch by deadline."""
        while self.giq:
            if not self._dispatch(self.giq[0], t):
                break
            self.giq.popleft()
        while self.gbq:
            if not self._dispatch(self.gbq[0][2], t):
                break
            heapq.heappop(self.gbq)

    def arrive_interactive(self, r: Req, t: float) -> None:
        self._arrivals_since_sample[0] += 1
        if self.giq or not self._dispatch(r, t):
            if not (self.policy.preempts_batch and not self.giq and self._preempt_for(r, t)):
                self.giq.append(r)

    def complete(self, r: Req, inst: Inst, t: float) -> None:
        if self.moves and r.rid in self.moves:
            self._end_move(self.moves[r.rid], Outcome.ABORTED_FINISHED, t)
        inst.in_flight -= 1
        if r.cls == BATCH:
            inst.n_batch -= 1
            self.batch_in_flight -= 1
            self.job_in_flight[r.job] -= 1
            self.batch_done += 1
            if t <= r.deadline + _EPS:
                self.batch_on_time += 1
            return
        self.int_in_flight -= 1
        ttft = r.first_token - r.arrival + self.cal.response_path_s
        itl = (t - r.first_token) / (r.output - 1) if r.output > 1 else 0.0
        if r.output > 1:
            inst.win_itl.append(itl)
        met = ttft <= self.cfg.slo.ttft_s and itl <= self.cfg.slo.itl_s
        self.ttft.append(ttft)
        self.itl.append(itl)
        self.e2e_sum += t - r.arrival + self.cal.response_path_s
        self.int_total += 1
        self.int_met += met
        self.window.append((t, int(met)))
        self.window_met += met

    def after_change(self, inst: Inst, t: float) -> None:
        if inst.draining and inst.in_flight == 0:
            self.stop(inst, t)
            return
        # Only this instance changed: queued work can move only if it has room now.
        if (self.giq or self.gbq) and inst.ready and not inst.draining and inst.in_flight < inst.limit:
            self.release(t)

    # ---- control -----------------------------------------------------------------------------
    def local_tick(self, t: float) -> None:
        cfg = self.local_cfg
        dt = self.cfg.local_interval_s
        for inst in self.live:
            if not inst.ready:
                continue
            inst.advance(t)
            tok = (inst.tokens - inst.last_tokens) / dt
            self.gen_rate[inst.idx] = (inst.gen_tokens - inst.last_gen) / dt
            new_pre = inst.preemptions - inst.last_preemptions
            inst.last_tokens, inst.last_gen, inst.last_preemptions = (
                inst.tokens,
                inst.gen_tokens,
                inst.preemptions,
            )
            inst.hist_ttft.append(inst.win_ttft)
            inst.hist_itl.append(inst.win_itl)
            while len(inst.hist_ttft) > self.local_window_ticks:
                inst.hist_ttft.popleft()
                inst.hist_itl.popleft()
            inst.win_ttft, inst.win_itl = [], []
            if inst.local_state is not None:
                latency_bound = inst.pool != Pool.BATCH
                ttfts = [x for w in inst.hist_ttft for x in w] if latency_bound else []
                itls = [x for w in inst.hist_itl for x in w] if latency_bound else []
                obs = LocalObservation(
                    ttft_p99_s=_p99(ttfts),
                    itl_p99_s=_p99(itls),
                    throughput_tokens_per_s=tok,
                    in_flight=inst.in_flight,
                    kv_usage_fraction=inst.kv_used() / inst.cal.kv_capacity_tokens,
                    new_preemptions=new_pre,
                )
                inst.local_state = next_limit(inst.local_state, obs, cfg)
                inst.limit = inst.local_state.limit
            inst.plan()
        if self.cfg.kunserve is not None:
            self.plan_memory(t, self.cfg.kunserve)
        if self.giq or self.gbq:
            self.release(t)

    def plan_memory(self, t: float, ks: KunServeConfig) -> None:
        """One memory-planner tick over the serving instances; its drops and restores take effect
        when their transition ends (a REGROUP event per member)."""
        cal = self.cal
        bs = cal.block_size_tokens
        members = []
        for i in self.live:
            if not i.ready:
                continue
            load = i.load()
            demand = sum(-(-(q.prompt + q.done) // bs) for q in (*i.eq_i, *i.eq_b))
            members.append(
                MemberView(
                    instance_id=i.iid,
                    model=cal.model,
                    kv_usage=load.kv_usage_fraction,
                    kv_free_blocks=load.kv_free_blocks,
                    queued_demand_blocks=demand,
                    waiting_requests=load.waiting_requests,
                    layers_total=cal.num_layers,
                    weight_bytes=cal.layer_weight_bytes,
                    kv_bytes_per_block=cal.kv_bytes_per_token * bs,
                    healthy=not i.draining,
                )
            )
        actions, self.planner_state = plan_memory(members, self.planner_state, t, ks.planner)
        by_id = {i.iid: i for i in self.live}
        for a in actions:
            g = len(a.group.members)
            if a.kind == "drop":
                self.groups_formed += 1
            else:
                self.groups_split += 1
            for iid in a.group.members:
                inst = by_id.get(iid)
                if inst is None:
                    continue
                kv = inst.kv_used()
                if a.kind == "drop":
                    self.push(t + drop_seconds(cal, g, kv, ks.costs), REGROUP, inst.idx, g)
                else:
                    self.push(t + restore_seconds(cal, g, kv, ks.costs), REGROUP, inst.idx, 1)

    def regroup(self, inst: Inst, group_size: int, t: float) -> None:
        """A member's transition ended: it serves with the pipeline member's costs and capacity
        (or its own again); work that no longer fits is preempted by the engine's own rule."""
        inst.advance(t)
        inst.group_size = group_size
        ks = self.cfg.kunserve
        assert ks is not None
        inst.cal = member_calibration(self.cal, group_size, ks.costs)
        if inst.run and inst.kv_used() >= inst.cal.kv_capacity_tokens - 0.5:
            inst._preempt_newest()
        inst.try_start()
        inst.plan()
        self.after_change(inst, t)

    def _attainment(self, t: float) -> float | None:
        horizon = t - self.cfg.attainment_window_s
        w = self.window
        while w and w[0][0] < horizon:
            self.window_met -= w.popleft()[1]
        return self.window_met / len(w) if w else None

    def replicas(self) -> dict[Pool, int]:
        out = dict.fromkeys(self.policy.pools, 0)
        for i in self.live:
            if not i.draining:
                out[i.pool] = out.get(i.pool, 0) + 1
        return out

    def observe(self, t: float) -> FleetObservation:
        groups = tuple(
            BatchGroup(
                j.job_id,
                self.job_queued[k],
                self.job_in_flight[k],
                j.expected_output_tokens,
                j.deadline_s,
            )
            for k, j in enumerate(self.jobs)
            if j.submit_s <= t and (self.job_queued[k] or self.job_in_flight[k])
        )
        for i in self.live:
            i.advance(t)
        return FleetObservation(
            now_s=t,
            replicas=self.replicas(),
            loads=tuple(i.full_load() for i in self.live if i.ready),
            interactive_in_flight=self.int_in_flight,
            interactive_queued=len(self.giq),
            batch_in_flight=self.batch_in_flight,
            batch_queued=len(self.gbq),
            interactive_attainment=self._attainment(t),
            batch_groups=groups,
        )

    def control_tick(self, t: float) -> None:
        decision = self.policy.decide(self.observe(t))
        self.apply(decision, t)
        if self.cfg.migration is not None:
            self.migrate(t)

    def apply(self, d: ScaleDecision, t: float) -> None:
        cur = self.replicas()
        for pool, target in d.targets.items():
            have = cur.get(pool, 0)
            if target == have:
                continue
            self.scale_events.append((t, pool.value, have, target, d.reasons.get(pool, "")))
            if target > have:
                for _ in range(target - have):
                    self.launch(pool, t)
                continue
            excess = have - target
            starting = [i for i in self.live if i.pool == pool and not i.ready and not i.draining]
            for inst in reversed(starting):
                if excess == 0:
                    break
                self.stop(inst, t)
                excess -= 1
            chosen = list(d.scale_in.get(pool, ()))
            by_id = {i.iid: i for i in self.live if i.pool == pool and i.ready and not i.draining}
            for iid in chosen:
                if excess == 0:
                    break
                inst = by_id.pop(iid, None)
                if inst is not None:
                    self.drain(inst, t)
                    excess -= 1
            for inst in sorted(by_id.values(), key=lambda i: (i.in_flight, i.iid)):
                if excess == 0:
                    break
                self.drain(inst, t)
                excess -= 1
        if self.giq or self.gbq:
            self.release(t)

    def drain(self, inst: Inst, t: float) -> None:
        """Take `inst` out of dispatch and stop it once empty. Queued work goes back to the
        gateway; without migration running batch work does too (it resumes elsewhere with a
        re-prefill) and running interactive work finishes here; with migration every running
        request is moved out now where a destination has room, and the rest of it by later
        rounds (a draining instance is every round's first source)."""
        inst.draining = True
        inst.touch()
        migrating = self.cfg.migration is not None
        for q in inst.requests():
            if q in inst.eq_i or (q in inst.eq_b if migrating else q.cls == BATCH):
                self._evict(q, inst, t)
        if inst.in_flight == 0:
            self.stop(inst, t)
        elif migrating:
            self.migrate(t, victims=(inst,))

    # ---- live migration ----------------------------------------------------------------------
    def migrate(self, t: float, victims: Collection[Inst] = ()) -> None:
        """One rescheduling round on the instances' Load (`Inst.full_load`, the control loop's
        view), through the policy the runtime calls. A round keeps at most `max_concurrent`
        migrations in flight, as the control loop does; a drain (`victims`) plans every running
        request of the victims at once, each to a destination with room, as the loop's drain does
        (the other instances are destinations only)."""
        cfg = self.cfg.migration
        assert cfg is not None
        ready = [i for i in self.live if i.ready]
        for i in ready:
            i.advance(t)
        loads = [i.full_load(with_requests=True) for i in ready]
        moving = {str(rid) for rid in self.moves}
        if victims:
            ids = {v.iid for v in victims}
            loads = [ld if ld.instance_id in ids else replace(ld, requests=()) for ld in loads]
            running = sum(ld.running_requests for ld in loads if ld.instance_id in ids)
            plan = [
                m
                for m in plan_migrations(loads, replace(cfg, max_migrations=max(1, running)), moving)
                if m.reason is Reason.DRAIN
            ]
        else:
            room = max(0, self.cfg.migration_costs.max_concurrent - len(self.moves))
            plan = plan_migrations(loads, cfg, moving)[:room] if room else []
        if not plan:
            return
        by_id = {i.iid: i for i in ready}
        for m in plan:
            self._start_move(m, by_id[m.source], by_id[m.destination], t)

    def _count(self, outcome: Outcome) -> None:
        self.migrations_by_outcome[outcome.value] = self.migrations_by_outcome.get(outcome.value, 0) + 1

    def _start_move(self, m: Migration, src: Inst, dst: Inst, t: float) -> None:
        """The copy begins: the destination reserves the request's KV; it decodes on meanwhile."""
        r = src.run.get(int(m.request_id))
        if r is None:
            self._count(Outcome.NOT_RUNNING)
            return
        tokens = r.prompt + src.generated(r)
        dst.advance(t)
        dst.reserved += tokens
        dst.plan()
        self.seq += 1
        mv = _Move(self.seq, r, src, dst, m.reason, tokens)
        self.moves[r.rid] = mv
        copy_s = self.cfg.migration_costs.copy_seconds(src.cal, tokens)
        self.push(t + copy_s, CUTOVER, r.rid, mv.mid)

    def _end_move(self, mv: _Move, outcome: Outcome, t: float) -> None:
        """An aborted migration: the destination's reservation is released. (Queued work sees
        the room at the next change: this may run inside the source's own event, which must not
        be re-entered by a dispatch.)"""
        del self.moves[mv.req.rid]
        self._count(outcome)
        dst = mv.dst
        if dst.stop_t >= 0:
            return
        dst.advance(t)
        dst.reserved -= mv.tokens
        dst.plan()

    def migration_event(self, kind: int, rid: int, mid: int, t: float) -> None:
        mv = self.moves.get(rid)
        if mv is None or mv.mid != mid:
            return
        if kind == CUTOVER:
            self._cutover(mv, t)
        else:
            self._resume(mv, t)

    def _cutover(self, mv: _Move, t: float) -> None:
        """The copy ended: the request leaves the source and pauses for the downtime, holding
        its KV on the destination, unless it left the source or no longer fits there."""
        r, src, dst = mv.req, mv.src, mv.dst
        src.advance(t)
        if src.run.get(r.rid) is not r:
            self._end_move(mv, Outcome.ABORTED_PREEMPTED, t)
            return
        if r.finish_step <= src.steps + _EPS:
            # Its last token is due now (the source's event at this instant completes it).
            self._end_move(mv, Outcome.ABORTED_FINISHED, t)
            return
        done = src.generated(r)
        need = r.prompt + done
        if dst.stop_t < 0:
            dst.advance(t)
        fits = (
            dst.stop_t < 0
            and dst.ready
            and not dst.draining
            and len(dst.run) < dst.cal.max_num_seqs
            and dst.kv_used() - mv.tokens + need <= dst.cal.kv_capacity_tokens
        )
        if not fits:
            self._end_move(mv, Outcome.ABORTED_NO_ROOM, t)
            return
        src._remove_running(r)
        src.in_flight -= 1
        if r.cls == BATCH:
            src.n_batch -= 1
            dst.n_batch += 1
        r.done = done
        r.inst = dst
        dst.in_flight += 1
        dst.reserved += need - mv.tokens
        mv.tokens = need
        src.try_start()
        src.plan()
        self.after_change(src, t)
        dst.plan()
        self.push(t + self.cfg.migration_costs.downtime_s, RESUME, r.rid, mv.mid)

    def _resume(self, mv: _Move, t: float) -> None:
        """The downtime ended: the request decodes on the destination from its context (its
        reservation becomes its KV, no re-prefill)."""
        del self.moves[mv.req.rid]
        r, dst = mv.req, mv.dst
        dst.advance(t)
        dst.reserved -= mv.tokens
        dst.start_decoding(r)
        dst.plan()
        self.migrations += 1
        self._count(Outcome.MIGRATED)
        key = mv.reason.value
        self.migrations_by_reason[key] = self.migrations_by_reason.get(key, 0) + 1

    def sample(self, t: float) -> None:
        s = self.samples
        dt = self.cfg.sample_interval_s
        s["t"].append(t)
        s["interactive_rps"].append(self._arrivals_since_sample[0] / dt)
        s["batch_rps"].append(self._arrivals_since_sample[1] / dt)
        self._arrivals_since_sample = [0, 0]
        reps = self.replicas()
        for p in (Pool.INTERACTIVE, Pool.MIXED, Pool.BATCH):
            s[p.value].append(reps.get(p, 0))
        s["ready"].append(sum(1 for i in self.live if i.ready))
        att = self._attainment(t)
        s["attainment"].append(math.nan if att is None else att)
        s["batch_queue"].append(len(self.gbq))
        s["interactive_queue"].append(len(self.giq))
        s["grouped"].append(sum(1 for i in self.live if i.group_size > 1))

    # ---- main loop ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        cfg = self.cfg
        for pool, n in cfg.initial_replicas.items():
            for _ in range(n):
                self.launch(pool, 0.0, ready=True)
        arr_t = self.trace.arrival_s
        arr_p = self.trace.prompt_tokens.tolist()
        arr_o = self.trace.output_tokens.tolist()
        n_int = len(arr_t)
        arr_tl = arr_t.tolist()
        ai = 0
        ji = 0
        horizon = max(
            cfg.horizon_s,
            self.trace.duration_s,
            max((j.deadline_s for j in self.jobs), default=0.0),
        )
        next_local = cfg.local_interval_s
        next_control = cfg.control_interval_s
        next_sample = cfg.sample_interval_s
        events = self.events
        instances = self.instances
        rid = n_int
        t = 0.0
        inf = math.inf
        # sentinels: no bounds checks in the loop
        arr_tl.append(inf)
        job_t = [j.submit_s for j in self.jobs] + [inf]
        heappop = heapq.heappop
        t_tick = min(next_local, next_control, next_sample)
        # Order at equal times: ticks, then engine events, then arrivals, then batch jobs.
        while True:
            t_arr = arr_tl[ai]
            t_job = job_t[ji]
            t_ev = events[0][0] if events else inf
            if t_tick <= t_ev and t_tick <= t_arr and t_tick <= t_job:
                t = t_tick
                done = ai >= n_int and ji >= len(self.jobs) and self.int_in_flight == 0
                done = done and not self.giq and self.batch_done >= self.batch_total
                if (done and t >= horizon) or t > horizon + cfg.max_overrun_s:
                    break
                if t == next_local:
                    self.local_tick(t)
                    next_local += cfg.local_interval_s
                if t == next_control:
                    self.control_tick(t)
                    next_control += cfg.control_interval_s
                if t == next_sample:
                    self.sample(t)
                    next_sample += cfg.sample_interval_s
                t_tick = min(next_local, next_control, next_sample)
                continue
            if t_ev <= t_arr and t_ev <= t_job:
                t = t_ev
                _, _, kind, idx, version = heappop(events)
                if kind >= CUTOVER:
                    self.migration_event(kind, idx, version, t)
                    continue
                inst = instances[idx]
                if inst.stop_t >= 0:
                    continue
                if kind == ENGINE:
                    if version == inst.version:
                        inst.on_event(t)
                elif kind == READY:
                    inst.ready = True
                    inst.t_last = t
                    inst.plan()
                    if self.giq or self.gbq:
                        self.release(t)
                else:
                    self.regroup(inst, version, t)
                continue
            if t_arr <= t_job:
                t = t_arr
                r = Req(ai, INTERACTIVE, t, arr_p[ai], arr_o[ai], -1, inf)
                ai += 1
                self.arrive_interactive(r, t)
                continue
            t = t_job
            job = self.jobs[ji]
            for p, o in zip(job.prompt_tokens.tolist(), job.output_tokens.tolist(), strict=True):
                r = Req(rid, BATCH, t, p, o, ji, job.deadline_s)
                rid += 1
                self.seq += 1
                heapq.heappush(self.gbq, (job.deadline_s, self.seq, r))
            self.job_queued[ji] += len(job)
            self._arrivals_since_sample[1] += len(job)
            ji += 1
            self.release(t)
        end = t
        gpu_s = sum((i.stop_t if i.stop_t >= 0 else end) - i.start_t for i in self.instances)
        unfinished_int = n_int - self.int_total
        return SimResult(
            policy=self.policy.name,
            duration_s=end,
            gpu_hours=gpu_s / 3600.0,
            interactive_total=self.int_total + unfinished_int,
            interactive_met=self.int_met,
            ttft=np.asarray(self.ttft),
            itl=np.asarray(self.itl),
            batch_total=self.batch_total,
            batch_on_time=self.batch_on_time,
            batch_unfinished=self.batch_total - self.batch_done,
            scale_events=self.scale_events,
            migrations=self.migrations,
            evictions=self.evictions,
            preemptions=sum(i.preemptions for i in self.instances),
            peak_replicas=int(
                max((sum(v) for v in zip(*(self.samples[p.value] for p in Pool), strict=True)), default=0)
            ),
            samples=self.samples,
            mean_e2e_s=self.e2e_sum / self.int_total if self.int_total else 0.0,
            groups_formed=self.groups_formed,
            groups_split=self.groups_split,
            migrations_by_outcome=dict(sorted(self.migrations_by_outcome.items())),
            migrations_by_reason=dict(sorted(self.migrations_by_reason.items())),
        )


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]

"""Merge two serving engines into one pipeline and split them again (DESIGN.md section 5; issue 10).

KunServe answers KV pressure by grouping instances of one model: each keeps a share of the layers
and drops the rest, and the group serves as a pipeline. This drives the engine-side pieces
slofleet adds to vLLM for a group of two (vllm-kunserve-facts.md, "Suggested design"):

merge (the follower idle; the leader's requests in flight carry over, issue 10 item 3):
1. the follower's scheduler reports idle, both the same block size and block count (block ids
   the leader hands out must exist in the follower's KV), both workers the same model with
   nothing dropped;
2. `POST /pause?mode=keep` on both; then the leader requeues its running requests
   (`pipeline_requeue`): each gives up its KV and keeps its generated tokens, and resumes in the
   pipeline by recomputing them (one prefill each; its KV would otherwise have to be split
   layer by layer across the two engines). Queued requests just wait for the larger pool;
3. drop the unowned units with the existing `slofleet_drop`: the leader keeps `embed` and layers
   [0, mid), the follower layers [mid, n) and `head`;
4. workers enter pipeline mode (`slofleet_pipeline_enter`: the follower listens, the leader
   connects; forward and compute_logits are replaced, vllm_ext/pipeline.py);
5. schedulers enter their roles over their control sockets (`pipeline_follow`, then
   `pipeline_lead`; vllm_ext/pipeline_scheduler.py); both reset their prefix caches;
6. KV capacity extension (issue 10 item 2): each worker re-lays its KV buffer for only the
   layers it keeps (`slofleet_kv_relayout`, vllm_ext/kv_layout.py), sized to what fits its old
   KV buffer plus the weight bytes its drop freed (`slofleet_kv_fit`); both take the smaller of
   the two counts, since the follower must hold every block id the leader hands out. Then the
   leader's BlockPool grows to that count (`pipeline_blocks`), so the group admits the requests
   that the smaller pool queued. No block is copied: no request holds KV (the follower is idle, the
   leader's requests were requeued) and step 5 reset both prefix caches, so no block holds KV
   anyone reads. This runs after step 5 for that reason, and
   after the drop so the weights' memory is free before the larger KV buffer is allocated (each
   re-layout frees the old buffer before allocating the new one);
7. resume the follower, then the leader. From now on requests go to the leader only.
Any failure undoes the steps already taken in reverse and resumes both, serving alone as before.

split:
1. `POST /pause?mode=wait` on the leader: the merged requests finish (they need both engines'
   layers), new ones queue; then `mode=keep`, which the scheduler ops require;
2. wait until the follower has replayed every output the leader published (the last ones only
   free finished requests in its worker), then pause it;
3. schedulers leave (each resets its prefix cache), workers leave; the leader's BlockPool shrinks
   back to its count before the merge (refused if any block above it is in use), then each
   worker re-lays its KV for all layers at its own count from before the merge, and only then
   are the layers restored from the host weight store: KV first, so the merged buffer is gone
   before the weights come back (peak: the merged footprint, not merged KV plus all weights);
4. both resume serving alone.
A split that fails before the roles are left resumes both (still a pipeline); one that fails after
resumes only engines with no dropped layer (an engine generating with a dropped layer dies) and
says which stay paused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from slofleet.sidecar.memory.engine import EngineCallError, EngineControl
from slofleet.sidecar.memory.kv_grow import scheduler_command

PIPELINE_PROTOCOL = 1  # of the workers' slofleet_pipeline_* replies (vllm_ext/pipeline.py)


@dataclass(frozen=True, slots=True)
class PipelineMember:
    """One engine of the group: its HTTP URL (dev mode), its scheduler's control socket, and its
    host weight store (where its dropped units go and come back from)."""

    url: str
    scheduler_socket: str
    store_dir: str


class PipelineSwitchError(RuntimeError):
    """A merge or split that did not complete. `stage` names where it failed; `paused` lists the
    engines (URLs) left paused (empty when both serve)."""

    def __init__(self, stage: str, message: str, *, paused: tuple[str, ...] = ()) -> None:
        left = f" (left PAUSED: {', '.join(paused)})" if paused else ""
        super().__init__(f"pipeline switch failed at {stage}: {message}{left}")
        self.stage, self.paused = stage, paused


@dataclass(frozen=True, slots=True)
class PipelineSwitchResult:
    """What a merge or split did: the units each engine dropped (merge) or restored (split), the
    layer ranges of the pipeline made or ended, and seconds per stage (`paused_seconds`: from the
    first pause returning to the last resume returning; for a split, from the end of the drain,
    during which the leader still serves the merged requests)."""

    leader_units: tuple[str, ...]
    follower_units: tuple[str, ...]
    leader_layers: tuple[int, int]
    follower_layers: tuple[int, int]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    paused_seconds: float = 0.0
    total_seconds: float = 0.0
    rss_freed_bytes: dict[str, int] = field(default_factory=dict)  # merge: per role, from the drop
    # KV capacity of the leader's BlockPool before and after the switch; for a merge, the count
    # the budget arithmetic expects (min over members of (KV buffer bytes + dropped weight bytes)
    # // (bytes per block per layer x layers kept)) and after / before.
    kv_blocks_before: int = 0
    kv_blocks_after: int = 0
    kv_blocks_expected: int = 0
    kv_gain: float = 0.0
    kv_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # per role: KV buffer before, after
    kv_relayout_seconds: dict[str, float] = field(default_factory=dict)  # per role, in the worker
    # merge: the leader's running requests that gave up their KV to be recomputed in the pipeline,
    # and the tokens they had computed (the recompute's cost)
    requeued: int = 0
    requeued_tokens: int = 0


def layer_split(num_layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The layer ranges of the leader and the follower: [0, n//2) and [n//2, n)."""
    if num_layers < 2:
        raise ValueError(f"a pipeline of two needs at least 2 layers, the model has {num_layers}")
    mid = num_layers // 2
    return (0, mid), (mid, num_layers)


def unowned_units(role: str, num_layers: int) -> tuple[str, ...]:
    """The weight units a stage drops: the other stage's layers plus embed (follower) or head
    (leader)."""
    (lo, mid), (_, n) = layer_split(num_layers)
    if role == "leader":
        return (*(f"layer.{i}" for i in range(mid, n)), "head")
    if role == "follower":
        return ("embed", *(f"layer.{i}" for i in range(lo, mid)))
    raise ValueError(f"role: {role!r}")


class _Member:
    """A member plus its open EngineControl and the undo bookkeeping of one switch."""

    def __init__(self, role: str, member: PipelineMember, timeout_seconds: float) -> None:
        self.role, self.m = role, member
        self.control = _Control(member.url, timeout_seconds=timeout_seconds)
        self.paused = False

    async def sched(self, command: dict[str, Any], stage: str) -> dict[str, Any]:
        try:
            reply = await scheduler_command(self.m.scheduler_socket, command)
        except (OSError, ValueError, TimeoutError) as e:
            raise PipelineSwitchError(stage, f"{self.role} scheduler {self.m.scheduler_socket}: "
                                      f"{type(e).__name__}: {e}") from e  # fmt: skip
        if not reply.get("ok"):
            raise PipelineSwitchError(stage, f"{self.role} scheduler: {reply.get('error', reply)}")
        return reply

    async def rpc(self, method: str, *args: str, stage: str) -> dict[str, Any]:
        try:
            reply = await self.control.rpc(method, *args)
        except EngineCallError as e:
            raise PipelineSwitchError(stage, f"{self.role}: {e}") from e
        if not reply.get("ok"):
            detail = reply.get("error") or reply.get("message") or reply
            raise PipelineSwitchError(stage, f"{self.role} {method}: {detail}")
        if method.startswith("slofleet_pipeline_") and reply.get("protocol") != PIPELINE_PROTOCOL:
            raise PipelineSwitchError(stage, f"{self.role} {method}: protocol {reply.get('protocol')}, "
                                      f"expected {PIPELINE_PROTOCOL}")  # fmt: skip
        return reply

    async def pause(self, stage: str, mode: str = "keep") -> None:
        try:
            if mode == "wait":
                await self.control.pause_wait()
            else:
                await self.control.pause_keep()
        except EngineCallError as e:
            raise PipelineSwitchError(stage, f"{self.role}: {e}") from e
        self.paused = True

    async def resume(self) -> str:
        """Resume; returns "" or the error (rollback paths must not raise)."""
        try:
            await self.control.resume()
        except EngineCallError as e:
            return f"{self.role} resume: {e}"
        self.paused = False
        return ""


class _Control(EngineControl):
    async def pause_wait(self) -> None:
        """Stop admitting (new requests queue) and return once the running ones finished."""
        await self._call("POST", "/pause?mode=wait&clear_cache=false")


async def _quiet(coro: Any) -> str:
    try:
        await coro
    except (PipelineSwitchError, EngineCallError, OSError, ValueError, TimeoutError) as e:
        return str(e)
    return ""


async def _close(*members: _Member) -> None:
    for m in members:
        await m.control.close()


def _with_problems(error: PipelineSwitchError, problems: list[str], paused: list[str]) -> PipelineSwitchError:
    """A failed switch's error, with what its clean-up ran into and which engines stay paused."""
    detail = str(error) + ("; " + "; ".join(problems) if problems else "")
    return PipelineSwitchError(error.stage, detail, paused=tuple(paused))


def _refuse_busy_follower(info: dict[str, Any], stage: str) -> None:
    if info["running"] or info["waiting"]:
        raise PipelineSwitchError(
            stage, f"the follower has {info['running']} running and {info['waiting']} waiting "
            "requests; only the leader's requests carry over (move the follower's to the "
            "leader first, or pick an idle follower)",
        )  # fmt: skip


async def merge_pipeline(
    leader: PipelineMember,
    follower: PipelineMember,
    *,
    host: str = "127.0.0.1",
    timeout_seconds: float = 300.0,
) -> PipelineSwitchResult:
    """Merge two idle engines of one model into a pipeline; see the module docstring."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    lead, fol = _Member("leader", leader, timeout_seconds), _Member("follower", follower, timeout_seconds)
    for m in (lead, fol):
        await m.control.start()
    undo: list[tuple[str, Any]] = []  # (what, coroutine factory), undone in reverse
    paused_at = 0.0
    try:
        t = time.perf_counter()
        infos = [await m.sched({"op": "info"}, "check") for m in (lead, fol)]
        for m, info in zip((lead, fol), infos, strict=True):
            pipe = info.get("pipeline")
            if not isinstance(pipe, dict):
                raise PipelineSwitchError("check", f"{m.role} scheduler has no pipeline support: {info}")
            if pipe.get("role") is not None:
                raise PipelineSwitchError("check", f"{m.role} is already a pipeline {pipe['role']}")
            if m is fol:
                _refuse_busy_follower(info, "check")
        if infos[0]["pipeline"]["block_size"] != infos[1]["pipeline"]["block_size"]:
            sizes = [i["pipeline"]["block_size"] for i in infos]
            raise PipelineSwitchError("check", f"block sizes differ (leader, follower): {sizes}")
        if infos[1]["num_blocks"] < infos[0]["num_blocks"]:
            raise PipelineSwitchError(
                "check", f"the follower has {infos[1]['num_blocks']} KV blocks, fewer than the leader's "
                f"{infos[0]['num_blocks']}: the leader's block ids would not exist there",
            )  # fmt: skip
        status = [await m.rpc("slofleet_memory_status", stage="check") for m in (lead, fol)]
        if status[0]["model_fingerprint"] != status[1]["model_fingerprint"]:
            raise PipelineSwitchError("check", "the engines serve different models (fingerprints differ)")
        for m, s in zip((lead, fol), status, strict=True):
            if s["dropped"]:
                raise PipelineSwitchError("check", f"{m.role} already has dropped units {s['dropped']}")
        n = int(status[0]["layers_total"])
        (l_lo, l_hi), (f_lo, f_hi) = layer_split(n)
        units = {"leader": unowned_units("leader", n), "follower": unowned_units("follower", n)}
        stages["check"] = time.perf_counter() - t

        t = time.perf_counter()
        for m in (lead, fol):
            await m.pause("pause")
        paused_at = time.perf_counter()
        # Checked again now that nothing steps: the check above may have been answered before a
        # request reached the follower, which would then refuse to follow only after both engines
        # dropped their layers; refusing here undoes nothing but the pause.
        _refuse_busy_follower(await fol.sched({"op": "info"}, "pause"), "pause")
        stages["pause"] = paused_at - t

        t = time.perf_counter()
        requeued = await lead.sched({"op": "pipeline_requeue"}, "requeue")
        stages["requeue"] = time.perf_counter() - t

        t = time.perf_counter()
        freed: dict[str, int] = {}
        dropped_bytes: dict[str, int] = {}
        for m in (lead, fol):
            r = await m.rpc("slofleet_drop", ",".join(units[m.role]), m.m.store_dir, "1", stage="drop")
            undo.append(("restore " + m.role, lambda m=m: m.rpc("slofleet_restore", "", m.m.store_dir,
                                                                stage="undo")))  # fmt: skip
            freed[m.role] = int(r["rss_before"]) - int(r["rss_after"])
            dropped_bytes[m.role] = int(r["bytes"])
        stages["drop"] = time.perf_counter() - t

        t = time.perf_counter()
        f_enter = await fol.rpc("slofleet_pipeline_enter", "follower", str(f_lo), str(f_hi), host, "0", "",
                                str(timeout_seconds), stage="worker-enter")  # fmt: skip
        undo.append(("worker leave follower", lambda: fol.rpc("slofleet_pipeline_leave", stage="undo")))
        await lead.rpc("slofleet_pipeline_enter", "leader", str(l_lo), str(l_hi), host, str(f_enter["port"]),
                       f_enter["token"], str(timeout_seconds), stage="worker-enter")  # fmt: skip
        undo.append(("worker leave leader", lambda: lead.rpc("slofleet_pipeline_leave", stage="undo")))
        stages["worker-enter"] = time.perf_counter() - t

        t = time.perf_counter()
        f_sched = await fol.sched({"op": "pipeline_follow", "host": host, "port": 0}, "scheduler-enter")
        undo.append(("scheduler leave follower", lambda: fol.sched({"op": "pipeline_leave"}, "undo")))
        await lead.sched({"op": "pipeline_lead", "host": host, "port": f_sched["port"],
                          "token": f_sched["token"]}, "scheduler-enter")  # fmt: skip
        undo.append(("scheduler leave leader", lambda: lead.sched({"op": "pipeline_leave"}, "undo")))
        stages["scheduler-enter"] = time.perf_counter() - t

        t = time.perf_counter()
        owned = {"leader": (l_lo, l_hi), "follower": (f_lo, f_hi)}
        home = {"leader": int(infos[0]["num_blocks"]), "follower": int(infos[1]["num_blocks"])}
        fits = {}
        for m in (lead, fol):
            lo, hi = owned[m.role]
            fits[m.role] = await m.rpc("slofleet_kv_fit", str(lo), str(hi), str(dropped_bytes[m.role]),
                                       stage="kv-relayout")  # fmt: skip
        expected = min(
            (f["buffer_bytes"] + dropped_bytes[role]) // (f["layer_block_bytes"] * f["owned_layers"])
            for role, f in fits.items()
        )
        target = min(int(f["blocks"]) for f in fits.values())
        if target != expected or target <= home["leader"]:
            raise PipelineSwitchError("kv-relayout", f"the workers fit {target} blocks for their layers, "
                                      f"expected {expected} > {home['leader']}: {fits}")  # fmt: skip
        kv_bytes: dict[str, tuple[int, int]] = {}
        relayout_seconds: dict[str, float] = {}
        for m in (lead, fol):
            lo, hi = owned[m.role]
            gone = ",".join(requeued["request_ids"]) if m is lead else ""  # their KV is recomputed
            r = await m.rpc("slofleet_kv_relayout", str(target), str(lo), str(hi), gone,
                            stage="kv-relayout")  # fmt: skip
            undo.append(("kv relayout " + m.role, lambda m=m, gone=gone: m.rpc(
                "slofleet_kv_relayout", str(home[m.role]), "0", str(n), gone, stage="undo")))  # fmt: skip
            kv_bytes[m.role] = (int(r["old_bytes"]), int(r["new_bytes"]))
            relayout_seconds[m.role] = float(r["seconds"])
        stages["kv-relayout"] = time.perf_counter() - t

        t = time.perf_counter()
        grown = await lead.sched({"op": "pipeline_blocks", "num_blocks": target}, "kv-grow")
        undo.append(("block pool leader", lambda: lead.sched(
            {"op": "pipeline_blocks", "num_blocks": home["leader"]}, "undo")))  # fmt: skip
        stages["kv-grow"] = time.perf_counter() - t

        t = time.perf_counter()
        for m in (fol, lead):
            err = await m.resume()
            if err:
                raise PipelineSwitchError("resume", err)
        stages["resume"] = time.perf_counter() - t
    except BaseException as e:
        problems = []
        for what, make in reversed(undo):
            err = await _quiet(make())
            if err:
                problems.append(f"undo {what}: {err}")
        paused = []
        for m in (lead, fol):
            if m.paused:
                err = await m.resume()
                if err:
                    problems.append(err)
                    paused.append(m.m.url)
        await _close(lead, fol)
        if isinstance(e, PipelineSwitchError):
            raise _with_problems(e, problems, paused) from e
        raise
    await _close(lead, fol)
    end = time.perf_counter()
    return PipelineSwitchResult(
        leader_units=units["leader"],
        follower_units=units["follower"],
        leader_layers=(l_lo, l_hi),
        follower_layers=(f_lo, f_hi),
        stage_seconds={k: round(v, 4) for k, v in stages.items()},
        paused_seconds=end - paused_at,
        total_seconds=end - start,
        rss_freed_bytes=freed,
        kv_blocks_before=home["leader"],
        kv_blocks_after=int(grown["new_blocks"]),
        kv_blocks_expected=expected,
        kv_gain=int(grown["new_blocks"]) / home["leader"],
        kv_bytes=kv_bytes,
        kv_relayout_seconds=relayout_seconds,
        requeued=int(requeued["requeued"]),
        requeued_tokens=int(requeued["requeued_tokens"]),
    )


async def split_pipeline(
    leader: PipelineMember,
    follower: PipelineMember,
    *,
    timeout_seconds: float = 300.0,
) -> PipelineSwitchResult:
    """Split a merged pair back into two engines serving alone; see the module docstring."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    lead, fol = _Member("leader", leader, timeout_seconds), _Member("follower", follower, timeout_seconds)
    for m in (lead, fol):
        await m.control.start()
    left_roles = False
    paused_at = 0.0
    try:
        t = time.perf_counter()
        infos = [await m.sched({"op": "info"}, "check") for m in (lead, fol)]
        roles = [info["pipeline"]["role"] for info in infos]
        if roles != ["leader", "follower"]:
            raise PipelineSwitchError("check", f"the engines' roles are {roles}, not leader/follower")
        ranges = {}
        for m in (lead, fol):
            st = await m.rpc("slofleet_pipeline_status", stage="check")
            if st.get("role") != m.role:
                raise PipelineSwitchError("check", f"{m.role}'s worker is in role {st.get('role')}")
            ranges[m.role] = (int(st["layers"][0]), int(st["layers"][1]))
        stages["check"] = time.perf_counter() - t

        t = time.perf_counter()
        await lead.pause("drain", mode="wait")
        paused_at = time.perf_counter()
        await lead.pause("drain", mode="keep")
        stages["drain"] = time.perf_counter() - t

        t = time.perf_counter()
        published = int((await lead.sched({"op": "info"}, "catch-up"))["pipeline"]["published"])
        deadline = time.monotonic() + timeout_seconds
        while True:
            pipe = (await fol.sched({"op": "info"}, "catch-up"))["pipeline"]
            if int(pipe["completed"]) == published and not pipe["pending"]:
                break
            if time.monotonic() > deadline:
                raise PipelineSwitchError("catch-up", f"the follower replayed {pipe} of {published} outputs")
            await asyncio.sleep(0.01)
        await fol.pause("catch-up")
        stages["catch-up"] = time.perf_counter() - t

        t = time.perf_counter()
        left_roles = True  # from here on a failure leaves the engines split, not merged
        await lead.sched({"op": "pipeline_leave"}, "scheduler-leave")
        await fol.sched({"op": "pipeline_leave"}, "scheduler-leave")
        stages["scheduler-leave"] = time.perf_counter() - t

        t = time.perf_counter()
        for m in (lead, fol):
            await m.rpc("slofleet_pipeline_leave", stage="worker-leave")
        stages["worker-leave"] = time.perf_counter() - t

        t = time.perf_counter()
        merged_blocks = int(infos[0]["num_blocks"])
        home = {"leader": infos[0]["pipeline"]["home_blocks"] or merged_blocks,
                "follower": int(infos[1]["num_blocks"])}  # fmt: skip
        if home["leader"] != merged_blocks:
            await lead.sched({"op": "pipeline_blocks", "num_blocks": home["leader"]}, "kv-shrink")
        stages["kv-shrink"] = time.perf_counter() - t

        t = time.perf_counter()
        kv_bytes: dict[str, tuple[int, int]] = {}
        relayout_seconds: dict[str, float] = {}
        n = ranges["follower"][1]
        for m in (lead, fol):
            r = await m.rpc("slofleet_kv_relayout", str(home[m.role]), "0", str(n), stage="kv-relayout")
            kv_bytes[m.role] = (int(r["old_bytes"]), int(r["new_bytes"]))
            relayout_seconds[m.role] = float(r["seconds"])
        stages["kv-relayout"] = time.perf_counter() - t

        t = time.perf_counter()
        restored: dict[str, tuple[str, ...]] = {}
        for m in (lead, fol):
            r = await m.rpc("slofleet_restore", "", m.m.store_dir, stage="restore")
            restored[m.role] = tuple(r["restored"])
        stages["restore"] = time.perf_counter() - t

        t = time.perf_counter()
        for m in (lead, fol):
            err = await m.resume()
            if err:
                raise PipelineSwitchError("resume", err)
        stages["resume"] = time.perf_counter() - t
    except BaseException as e:
        paused, problems = [], []
        for m in (lead, fol):
            if not m.paused:
                continue
            safe = True
            if left_roles:  # resume only an engine whose layers are all back
                try:
                    safe = not (await m.control.rpc("slofleet_memory_status")).get("dropped")
                except EngineCallError as err:
                    safe = False
                    problems.append(str(err))
            err_text = await m.resume() if safe else "layers still dropped"
            if err_text:
                paused.append(m.m.url)
                problems.append(f"{m.role}: {err_text}")
        await _close(lead, fol)
        if isinstance(e, PipelineSwitchError):
            raise _with_problems(e, problems, paused) from e
        raise
    await _close(lead, fol)
    end = time.perf_counter()
    return PipelineSwitchResult(
        leader_units=restored["leader"],
        follower_units=restored["follower"],
        leader_layers=ranges["leader"],
        follower_layers=ranges["follower"],
        stage_seconds={k: round(v, 4) for k, v in stages.items()},
        paused_seconds=end - paused_at,
        total_seconds=end - start,
        kv_blocks_before=merged_blocks,
        kv_blocks_after=home["leader"],
        kv_gain=home["leader"] / merged_blocks,
        kv_bytes=kv_bytes,
        kv_relayout_seconds=relayout_seconds,
    )

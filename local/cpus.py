"""Which CPU cores each local engine's compute threads run on.

Why: vLLM's CPU backend binds its OpenMP threads itself, and in its default `auto` mode every
engine picks the same cores (all allowed cores but one it reserves). Two engines of one machine
then share those cores while the rest idle: on a 2-core box both engines bound core 0, each ran at
half speed, and their spinning threads starved the other's. The local fleet therefore gives each
engine its own share of the machine's cores (`VLLM_CPU_OMP_THREADS_BIND`), sized for the most
instances the service may run, and hands a share back when its instance goes. A binding the user
set in the environment is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_groups(cpus: Sequence[int], slots: int) -> list[tuple[int, ...]]:
    """`cpus` (sorted) cut into min(slots, len(cpus)) contiguous groups whose sizes differ by at
    most one: neighbouring ids are usually cores of one socket."""
    if not cpus:
        raise ValueError("no CPU to place engines on")
    n = max(1, min(slots, len(cpus)))
    ordered = sorted(cpus)
    size, extra = divmod(len(ordered), n)
    groups, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        groups.append(tuple(ordered[start:end]))
        start = end
    return groups


def bind_value(group: Sequence[int]) -> str:
    """The group in vLLM's CPU list syntax ("0,1,2" is what `parse_id_list` reads)."""
    return ",".join(str(c) for c in group)


class CpuPlacer:
    """Assigns each instance the group fewest live instances use (lowest index on ties)."""

    def __init__(self, cpus: Sequence[int], slots: int) -> None:
        self.groups = cpu_groups(cpus, slots)
        self._owner: dict[str, int] = {}

    def assign(self, instance_id: str) -> str:
        users = [0] * len(self.groups)
        for g in self._owner.values():
            users[g] += 1
        g = min(range(len(self.groups)), key=lambda k: (users[k], k))
        self._owner[instance_id] = g
        return bind_value(self.groups[g])

    def release(self, instance_id: str) -> None:
        self._owner.pop(instance_id, None)

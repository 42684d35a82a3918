"""The drift check behind apply_object: what the API server hands back for an object the
operator wrote must count as "unchanged", or every reconcile would patch and re-trigger itself."""

from __future__ import annotations

import copy
from typing import Any

from slofleet.instance import Pool
from slofleet.operator.reconcile import _live_replicas, is_subset
from slofleet.operator.render import Images, pool_deployment_name, render_all
from slofleet.spec import LLMService, parse_spec


def served(obj: Any) -> Any:
    """Roughly what a real API server returns: defaults added, empty values dropped (omitempty),
    quantities canonicalized."""
    if isinstance(obj, dict):
        out = {k: served(v) for k, v in obj.items() if v not in ("", [], None, False)}
        if "containerPort" in out:
            out.setdefault("protocol", "TCP")
        if "image" in out:
            out.setdefault("terminationMessagePath", "/dev/termination-log")
            out.setdefault("imagePullPolicy", "IfNotPresent")
        return out
    if isinstance(obj, list):
        return [served(v) for v in obj]
    canonical = {"0.5": "500m", "1024Mi": "1Gi", 2: "2"}
    return canonical.get(obj, obj) if isinstance(obj, str | int) and not isinstance(obj, bool) else obj


def test_served_objects_are_unchanged() -> None:
    spec = parse_spec(
        {
            "model": "org/m",
            "engine": {"resources": {"gpu": 2, "cpu": "0.5", "memory": "1024Mi"}, "tensorParallelSize": 2,
                       "env": [{"name": "EMPTY"}]},
        }
    )  # fmt: skip
    service = LLMService(name="s", namespace="ns", spec=spec, uid="u")
    for desired in render_all(service, Images()):
        current = served(copy.deepcopy(desired))
        current.setdefault("status", {})
        assert is_subset(desired, current), desired["kind"]


def test_real_differences_are_seen() -> None:
    assert not is_subset({"spec": {"replicas": 2}}, {"spec": {"replicas": 3}})
    assert not is_subset({"args": ["a", "b"]}, {"args": ["a"]})
    assert not is_subset({"cpu": "1"}, {"cpu": "500m"})
    assert not is_subset({"image": "x:1"}, {})
    assert not is_subset({"port": "http"}, {"port": "grpc"})
    assert is_subset({"env": [{"name": "A", "value": ""}]}, {"env": [{"name": "A"}]})


def test_pool_replicas_come_from_the_object_read_right_before_the_patch() -> None:
    """Reconcile renders every object from reads made at its start; the control loop may change a
    pool's replicas meanwhile. Patching the stale count undid a scale-out and made the ReplicaSet
    delete a pod nobody chose (a flaky operator autoscaling test showed it). The replicas written
    are derived from the live object instead, clamped into the pool's bounds as before."""
    spec = parse_spec({"model": "org/m", "replicas": {"min": 1, "max": 4, "initial": 1},
                       "autoscaling": {"policy": "chiron"}})  # fmt: skip
    service = LLMService(name="s", namespace="ns", spec=spec, uid="u")
    name = pool_deployment_name("s", Pool.INTERACTIVE)
    rendered = render_all(service, Images(), {Pool.INTERACTIVE: 3})
    stale = next(d for d in rendered if d["metadata"]["name"] == name)
    assert stale["spec"]["replicas"] == 3
    live = served(copy.deepcopy(stale))
    live["spec"]["replicas"] = 4  # the control loop scaled out after reconcile read 3
    fresh = _live_replicas(spec, Pool.INTERACTIVE, stale, live)
    assert fresh["spec"]["replicas"] == 4 and is_subset(fresh, live), "a stale count must not be patched"
    assert stale["spec"]["replicas"] == 3, "the rendered object is not modified"
    live["spec"]["replicas"] = 9  # above spec.replicas.max: reconcile still clamps
    assert _live_replicas(spec, Pool.INTERACTIVE, stale, live)["spec"]["replicas"] == 4

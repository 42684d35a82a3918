"""The drift check behind apply_object: what the API server hands back for an object the
operator wrote must count as "unchanged", or every reconcile would patch and re-trigger itself."""

from __future__ import annotations

import copy
from typing import Any

from slofleet.operator.reconcile import is_subset
from slofleet.operator.render import Images, render_all
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

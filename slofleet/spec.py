"""The LLMService spec as typed dataclasses: the one parser and the one source of defaults.

The operator, the local fleet, the gateway and `slofleet render` all read an LLMService through
`parse_spec`, so a field means the same everywhere and a default lives in exactly one place (the
`default=` of a dataclass field below). crds/llmservice.yaml repeats the defaults and bounds for
the API server; tests/test_crd.py proves the two agree.

Every error names the JSON path of the bad field and says what would be accepted, because the
person reading it is editing a YAML file (or `kubectl edit`) and needs to know where to look.

The module is pure: no Kubernetes client, no I/O except `load_llmservice_file`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

API_GROUP = "slofleet.io"
API_VERSION = "v1alpha1"
KIND = "LLMService"
PLURAL = "llmservices"

AutoscalingPolicy = Literal["chiron", "utilization", "queue", "static"]
MigrationTrigger = Literal["loadBalance", "defragment", "priority", "drain"]

# Kubernetes resource.Quantity, as the API server accepts it (e.g. "500m", "40Gi", "1.5", "2e3").
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
# An environment variable name as Kubernetes accepts it in a container's env.
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)


class SpecError(ValueError):
    """A spec that cannot be used; `path` is the JSON path of the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _rule(
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    min_length: int | None = None,
    pattern: str | None = None,
    quantity: bool = False,
) -> dict[str, Any]:
    """Field metadata that the parser enforces and tests/test_crd.py compares with the CRD."""
    found = {
        "minimum": minimum,
        "maximum": maximum,
        "exclusiveMinimum": exclusive_minimum or None,
        "minLength": min_length,
        "pattern": pattern,
        "quantity": quantity or None,
    }
    return {key: value for key, value in found.items() if value is not None}


@dataclass(frozen=True)
class EnvVar:
    name: str = field(metadata=_rule(pattern=ENV_NAME_PATTERN))
    value: str = ""


@dataclass(frozen=True)
class EngineResources:
    # GPUs per engine pod (`nvidia.com/gpu`); 0 runs the CPU build of vLLM.
    gpu: int = field(default=0, metadata=_rule(minimum=0, maximum=16))
    cpu: str = field(default="2", metadata=_rule(quantity=True))
    memory: str = field(default="8Gi", metadata=_rule(quantity=True))


@dataclass(frozen=True)
class Engine:
    # None: the operator's SLOFLEET_ENGINE_IMAGE (an image with slofleet's vLLM plugin installed).
    image: str | None = field(default=None, metadata=_rule(min_length=1))
    # Extra vLLM server arguments, appended after the ones slofleet derives from the spec.
    args: list[str] = field(default_factory=list)
    resources: EngineResources = field(default_factory=EngineResources)
    tensor_parallel_size: int = field(default=1, metadata=_rule(minimum=1, maximum=16))
    max_model_len: int | None = field(default=None, metadata=_rule(minimum=16))
    env: list[EnvVar] = field(default_factory=list)


@dataclass(frozen=True)
class ModelVolume:
    """Where a model given as a path lives: exactly one of a PVC or a node's host path."""

    claim_name: str | None = field(default=None, metadata=_rule(min_length=1))
    host_path: str | None = field(default=None, metadata=_rule(pattern=r"^/"))
    mount_path: str = field(default="/models", metadata=_rule(pattern=r"^/"))


@dataclass(frozen=True)
class Replicas:
    min: int = field(default=1, metadata=_rule(minimum=0, maximum=1000))
    max: int = field(default=4, metadata=_rule(minimum=1, maximum=1000))
    # Engine pods at creation, and the target of `kubectl scale` (the scale subresource);
    # None means `min`. Under an autoscaling policy other than `static` the control loop owns the
    # count afterwards; `initial` only sets where it starts.
    initial: int | None = field(default=None, metadata=_rule(minimum=0, maximum=1000))


@dataclass(frozen=True)
class PoolBounds:
    min: int = field(default=0, metadata=_rule(minimum=0, maximum=1000))
    # None: bounded only by spec.replicas.max.
    max: int | None = field(default=None, metadata=_rule(minimum=0, maximum=1000))


@dataclass(frozen=True)
class Pools:
    interactive: PoolBounds = field(default_factory=PoolBounds)
    mixed: PoolBounds = field(default_factory=PoolBounds)
    batch: PoolBounds = field(default_factory=PoolBounds)


@dataclass(frozen=True)
class InteractiveSLO:
    ttft_seconds: float = field(default=1.0, metadata=_rule(minimum=0, exclusive_minimum=True, maximum=600))
    itl_milliseconds: float = field(
        default=100.0, metadata=_rule(minimum=0, exclusive_minimum=True, maximum=60000)
    )
    percentile: float = field(default=99.0, metadata=_rule(minimum=50, maximum=99.99))


@dataclass(frozen=True)
class BatchSLO:
    deadline_minutes: int = field(default=60, metadata=_rule(minimum=1, maximum=10080))


@dataclass(frozen=True)
class SLO:
    interactive: InteractiveSLO = field(default_factory=InteractiveSLO)
    batch: BatchSLO = field(default_factory=BatchSLO)


@dataclass(frozen=True)
class Autoscaling:
    policy: AutoscalingPolicy = "chiron"
    interval_seconds: int = field(default=5, metadata=_rule(minimum=1, maximum=3600))
    scale_down_stabilization_seconds: int = field(default=120, metadata=_rule(minimum=0, maximum=86400))
    max_scale_step: int = field(default=2, metadata=_rule(minimum=1, maximum=100))
    # Pod creation to serving, assumed until the control loop has measured one; warm standby
    # wakes a parked instance instead of creating one only when waking is faster.
    cold_start_seconds: int = field(default=60, metadata=_rule(minimum=1, maximum=3600))


def _all_triggers() -> list[MigrationTrigger]:
    return ["loadBalance", "defragment", "priority", "drain"]


@dataclass(frozen=True)
class Migration:
    enabled: bool = True
    triggers: list[MigrationTrigger] = field(default_factory=_all_triggers)


@dataclass(frozen=True)
class Memory:
    # KunServe-style parameter drop under KV pressure: opt-in until it has been measured on GPUs.
    parameter_drop: bool = False
    # Fraction of the model's layers every instance keeps while a group runs as a pipeline.
    min_layers_resident: float = field(
        default=0.5, metadata=_rule(minimum=0, exclusive_minimum=True, maximum=1)
    )
    # Instances that scale-in may park in warm standby (weights in the pod's host memory, engine
    # memory released, no traffic) instead of deleting them, so that scale-out wakes them in
    # seconds instead of a cold start; 0 switches standby off. Parked pods are not counted in
    # replicas.max (that bounds serving instances) but in the pool Deployments' replicas.
    standby: int = field(default=0, metadata=_rule(minimum=0, maximum=100))
    # A parked instance is deleted after this long (it holds host memory and, on GPUs, a node).
    standby_ttl_seconds: int = field(default=1800, metadata=_rule(minimum=0, maximum=604800))


@dataclass(frozen=True)
class Gateway:
    replicas: int = field(default=1, metadata=_rule(minimum=1, maximum=100))
    # None: the operator's SLOFLEET_IMAGE.
    image: str | None = field(default=None, metadata=_rule(min_length=1))


@dataclass(frozen=True)
class SecretKeyRef:
    name: str = field(metadata=_rule(min_length=1))
    key: str = field(default="token", metadata=_rule(min_length=1))


@dataclass(frozen=True)
class Sidecar:
    # The Secret holding the bearer token that the sidecar's gRPC server requires; without it the
    # sidecar relies on the NetworkPolicy in deploy/ alone.
    token_secret_ref: SecretKeyRef | None = None


@dataclass(frozen=True)
class LLMServiceSpec:
    # A hub id (e.g. meta-llama/Meta-Llama-3-8B-Instruct) or an absolute path inside modelVolume.
    model: str = field(metadata=_rule(min_length=1))
    engine: Engine = field(default_factory=Engine)
    model_volume: ModelVolume | None = None
    replicas: Replicas = field(default_factory=Replicas)
    pools: Pools = field(default_factory=Pools)
    slo: SLO = field(default_factory=SLO)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    migration: Migration = field(default_factory=Migration)
    memory: Memory = field(default_factory=Memory)
    gateway: Gateway = field(default_factory=Gateway)
    sidecar: Sidecar = field(default_factory=Sidecar)

    @property
    def initial_replicas(self) -> int:
        return self.replicas.min if self.replicas.initial is None else self.replicas.initial

    @property
    def model_is_path(self) -> bool:
        return self.model.startswith("/")


def json_name(python_name: str) -> str:
    """snake_case field -> the camelCase key used in YAML and the CRD."""
    head, *rest = python_name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "an object"
    if get_origin(tp) is list:
        return "a list"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _check_rules(value: Any, rules: Mapping[str, Any], path: str) -> None:
    if "minimum" in rules:
        low = rules["minimum"]
        if rules.get("exclusiveMinimum") and value <= low:
            raise SpecError(path, f"must be > {low} (got {value})")
        if value < low:
            raise SpecError(path, f"must be >= {low} (got {value})")
    if "maximum" in rules and value > rules["maximum"]:
        raise SpecError(path, f"must be <= {rules['maximum']} (got {value})")
    if "minLength" in rules and len(value) < rules["minLength"]:
        raise SpecError(path, "must not be empty")
    if "pattern" in rules and not re.search(rules["pattern"], value):
        raise SpecError(path, f"must match {rules['pattern']} (got {value!r})")


def _convert(raw: Any, tp: Any, rules: Mapping[str, Any], path: str) -> Any:
    """Check one value against its declared Python type and rules; return the typed value."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in get_args(tp) if arg is not type(None)]
        return None if raw is None else _convert(raw, inner[0], rules, path)
    if dataclasses.is_dataclass(tp):
        assert isinstance(tp, type)
        return _build(tp, raw, path)
    if origin is list:
        if not isinstance(raw, list):
            raise SpecError(path, f"must be a list (got {type(raw).__name__})")
        (item_tp,) = get_args(tp)
        return [_convert(item, item_tp, {}, f"{path}[{i}]") for i, item in enumerate(raw)]
    if origin is Literal:
        allowed = get_args(tp)
        if raw not in allowed:
            raise SpecError(path, f"must be one of {', '.join(allowed)} (got {raw!r})")
        return raw
    if tp is bool:
        if not isinstance(raw, bool):
            raise SpecError(path, f"must be true or false (got {raw!r})")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SpecError(path, f"must be an integer (got {raw!r})")
    elif tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise SpecError(path, f"must be a number (got {raw!r})")
        raw = float(raw)
    elif tp is str:
        if rules.get("quantity") and isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise SpecError(path, f"must be a string (got {raw!r})")
        if rules.get("quantity") and not _QUANTITY_RE.match(raw):
            raise SpecError(path, f"must be a Kubernetes quantity such as 2, 500m or 40Gi (got {raw!r})")
    _check_rules(raw, rules, path)
    return raw


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise SpecError(path, f"must be an object (got {type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {json_name(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", f"unknown field; known fields are {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[f.name] = _convert(raw[key], hints[f.name], f.metadata, f"{path}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{path}.{key}", f"is required ({_type_name(hints[f.name])})")
    return cls(**kwargs)


def _check_cross_fields(spec: LLMServiceSpec) -> None:
    """The rules that involve several fields; the CRD states each one as a CEL rule too."""
    r = spec.replicas
    if r.min > r.max:
        raise SpecError("spec.replicas.min", f"must be <= spec.replicas.max (got {r.min} > {r.max})")
    if r.initial is not None and not r.min <= r.initial <= r.max:
        raise SpecError(
            "spec.replicas.initial",
            f"must be within spec.replicas.min..max = {r.min}..{r.max} (got {r.initial})",
        )
    for name in ("interactive", "mixed", "batch"):
        pool: PoolBounds = getattr(spec.pools, name)
        if pool.max is not None and pool.min > pool.max:
            raise SpecError(
                f"spec.pools.{name}.min", f"must be <= spec.pools.{name}.max (got {pool.min} > {pool.max})"
            )
    pool_min = spec.pools.interactive.min + spec.pools.mixed.min + spec.pools.batch.min
    if pool_min > r.max:
        raise SpecError(
            "spec.pools", f"the pools' min add up to {pool_min}, more than spec.replicas.max = {r.max}"
        )
    volume = spec.model_volume
    if volume is not None and (volume.claim_name is None) == (volume.host_path is None):
        raise SpecError("spec.modelVolume", "set exactly one of claimName or hostPath")
    if len(set(spec.migration.triggers)) != len(spec.migration.triggers):
        raise SpecError("spec.migration.triggers", "must not repeat a trigger")


def parse_spec(raw: Any, path: str = "spec") -> LLMServiceSpec:
    """Validate an LLMService `spec` mapping and fill in every default. Raises SpecError."""
    spec = _build(LLMServiceSpec, raw, path)
    assert isinstance(spec, LLMServiceSpec)
    _check_cross_fields(spec)
    return spec


def spec_to_dict(value: Any) -> Any:
    """The fully defaulted spec in the YAML/CRD shape (camelCase keys, None omitted)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            json_name(f.name): spec_to_dict(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list):
        return [spec_to_dict(item) for item in value]
    return value


@dataclass(frozen=True)
class Problem:
    """A spec the schema accepts but that cannot work; the operator reports it as Degraded."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def semantic_problems(spec: LLMServiceSpec) -> list[Problem]:
    """Checks that need knowledge of how the engine runs, beyond what a schema can express."""
    problems: list[Problem] = []
    tp, gpus = spec.engine.tensor_parallel_size, spec.engine.resources.gpu
    if gpus > 0 and tp > gpus:
        problems.append(
            Problem(
                "spec.engine.tensorParallelSize",
                f"{tp} needs {tp} GPUs per pod but spec.engine.resources.gpu is {gpus}; "
                f"lower tensorParallelSize or raise resources.gpu",
            )
        )
    if gpus == 0 and tp > 1:
        problems.append(
            Problem(
                "spec.engine.tensorParallelSize",
                f"{tp} needs GPUs but spec.engine.resources.gpu is 0 (the CPU build runs one worker per pod)",
            )
        )
    if spec.model_is_path:
        volume = spec.model_volume
        if volume is None:
            problems.append(
                Problem(
                    "spec.modelVolume", f"spec.model is a path ({spec.model}) but no modelVolume holds it"
                )
            )
        elif not spec.model.startswith(volume.mount_path.rstrip("/") + "/"):
            problems.append(
                Problem(
                    "spec.model",
                    f"path {spec.model} is outside spec.modelVolume.mountPath ({volume.mount_path})",
                )
            )
    if not spec.migration.enabled and spec.memory.parameter_drop:
        problems.append(
            Problem(
                "spec.memory.parameterDrop",
                "needs spec.migration.enabled: requests move between instances when a group forms",
            )
        )
    return problems


@dataclass(frozen=True)
class LLMService:
    """A whole LLMService object: identity plus the parsed spec."""

    name: str
    namespace: str
    spec: LLMServiceSpec
    uid: str | None = None
    generation: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def parse_llmservice(obj: Any, default_namespace: str = "default") -> LLMService:
    """Validate a whole LLMService object (apiVersion, kind, metadata.name, spec)."""
    if not isinstance(obj, Mapping):
        raise SpecError("$", f"an LLMService must be a mapping (got {type(obj).__name__})")
    want = f"{API_GROUP}/{API_VERSION}"
    if obj.get("apiVersion") != want:
        raise SpecError("apiVersion", f"must be {want} (got {obj.get('apiVersion')!r})")
    if obj.get("kind") != KIND:
        raise SpecError("kind", f"must be {KIND} (got {obj.get('kind')!r})")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", name):
        raise SpecError(
            "metadata.name",
            f"must be a DNS label of at most 52 characters (it prefixes the objects it owns; got {name!r})",
        )
    if "spec" not in obj:
        raise SpecError("spec", "is required")
    return LLMService(
        name=name,
        namespace=meta.get("namespace") or default_namespace,
        spec=parse_spec(obj["spec"]),
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        labels=dict(meta.get("labels") or {}),
    )


def _line_of(node: yaml.Node, path: str) -> int | None:
    """The 1-based line of a JSON path (spec.replicas.min, spec.env[0].name) in a composed YAML tree."""
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and part.startswith("["):
            index = int(part[1:-1])
            if index >= len(node.value):
                break
            node = node.value[index]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_llmservice_file(path: str | Path, default_namespace: str = "default") -> LLMService:
    """Read one LLMService from a YAML file; errors carry the file name and line."""
    path = Path(path)
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        obj = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(where, f"invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(str(path), f"invalid YAML: {exc}") from exc
    try:
        return parse_llmservice(obj, default_namespace)
    except SpecError as exc:
        line = _line_of(node, exc.path) if node is not None else None
        raise SpecError(f"{path}:{line}: {exc.path}" if line else f"{path}: {exc.path}", exc.message) from exc

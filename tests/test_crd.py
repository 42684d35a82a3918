"""crds/llmservice.yaml against the samples, a table of invalid specs, its CEL rules (run with
cel-python) and slofleet/spec.py (the single source of defaults: the two must agree).

The API server is not here, so its steps are re-done faithfully: structural defaulting from the
schema's `default`s, OpenAPI validation (jsonschema's Draft 4 is the subset a structural schema
uses, with x-kubernetes-int-or-string mapped to "integer or string"), then the CEL rules.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import celpy
import jsonschema
import pytest
import yaml

from slofleet import spec as specmod
from slofleet.spec import SpecError, load_llmservice_file, parse_spec, semantic_problems, spec_to_dict

ROOT = Path(__file__).resolve().parent.parent
CRD = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]
SAMPLES = sorted((ROOT / "deploy/samples").glob("*.yaml"))


def _to_jsonschema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out["type"] = ["integer", "string"]
        return out
    if isinstance(node, list):
        return [_to_jsonschema(v) for v in node]
    return node


VALIDATOR = jsonschema.Draft4Validator(_to_jsonschema(SCHEMA))


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a default fills an absent field, then
    defaulting continues inside it."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def cel_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for key, sub in schema.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{key}" if path else key)


RULES = list(cel_rules(SCHEMA))


def at(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def cel_failures(obj: dict[str, Any]) -> list[str]:
    """The field path each failing CEL rule reports (its node plus its fieldPath)."""
    env = celpy.Environment()
    failed = []
    for path, rule in RULES:
        value = at(obj, path)
        if value is None:
            continue
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failed.append(path + rule.get("fieldPath", ""))
    return failed


def schema_failures(obj: dict[str, Any]) -> list[str]:
    out = []
    for error in VALIDATOR.iter_errors(obj):
        path = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            path += "." + error.message.split("'")[1]
        out.append(path)
    return out


def admit(obj: dict[str, Any]) -> list[str]:
    """What the API server would reject, as field paths (empty: accepted)."""
    obj = apply_defaults(SCHEMA, copy.deepcopy(obj))
    return schema_failures(obj) or cel_failures(obj)


def with_spec(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "slofleet.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "t"},
        "spec": {"model": "org/model", **spec},
    }


def test_crd_identity() -> None:
    names = CRD["spec"]["names"]
    assert (CRD["spec"]["group"], VERSION["name"], names["kind"]) == ("slofleet.io", "v1alpha1", "LLMService")
    assert names["shortNames"] == ["llms"]
    assert CRD["metadata"]["name"] == f"{names['plural']}.{CRD['spec']['group']}"
    cols = [c["name"].upper() for c in VERSION["additionalPrinterColumns"]]
    assert cols == ["MODEL", "READY", "REPLICAS", "STANDBY", "INTERACTIVE-SLO", "BATCH-QUEUE", "AGE"]
    for col in VERSION["additionalPrinterColumns"]:
        if col["jsonPath"].startswith(".status"):
            assert at(SCHEMA["properties"]["status"], _schema_path(col["jsonPath"][len(".status.") :])), col
    scale = VERSION["subresources"]["scale"]
    assert at(SPEC_SCHEMA, _schema_path(scale["specReplicasPath"][len(".spec.") :]))["type"] == "integer"
    assert "status" in VERSION["subresources"]


def _schema_path(dotted: str) -> str:
    return ".".join(f"properties.{part}" for part in dotted.split("."))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_are_admitted_and_runnable(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert admit(obj) == []
    service = load_llmservice_file(path)
    assert semantic_problems(service.spec) == []


def test_every_cel_rule_passes_on_the_defaults_and_fails_somewhere() -> None:
    assert len(RULES) >= 5
    assert cel_failures(apply_defaults(SCHEMA, with_spec(modelVolume={"claimName": "c"}))) == []
    failing = set()
    for _, changes, _ in INVALID:
        obj = apply_defaults(SCHEMA, with_spec(**changes))
        if not schema_failures(obj):  # the API server runs CEL only on schema-valid objects
            failing |= set(cel_failures(obj))
    # Each rule is exercised by at least one row of the table below.
    assert {path + rule.get("fieldPath", "") for path, rule in RULES} <= failing


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("min>max", {"replicas": {"min": 5, "max": 3}}, "spec.replicas.min"),
    ("initial>max", {"replicas": {"min": 1, "max": 3, "initial": 4}}, "spec.replicas.initial"),
    ("initial<min", {"replicas": {"min": 2, "max": 3, "initial": 1}}, "spec.replicas.initial"),
    ("batch pool min>max", {"pools": {"batch": {"min": 3, "max": 1}}}, "spec.pools.batch.min"),
    ("mixed pool min>max", {"pools": {"mixed": {"min": 2, "max": 1}}}, "spec.pools.mixed.min"),
    (
        "interactive pool min>max",
        {"pools": {"interactive": {"min": 1, "max": 0}}},
        "spec.pools.interactive.min",
    ),
    (
        "pools exceed max",
        {"replicas": {"max": 2}, "pools": {"interactive": {"min": 2}, "mixed": {"min": 1}}},
        "spec.pools",
    ),
    ("two volumes", {"modelVolume": {"claimName": "c", "hostPath": "/m"}}, "spec.modelVolume"),
    ("no volume source", {"modelVolume": {"mountPath": "/m"}}, "spec.modelVolume"),
    ("policy", {"autoscaling": {"policy": "magic"}}, "spec.autoscaling.policy"),
    ("interval 0", {"autoscaling": {"intervalSeconds": 0}}, "spec.autoscaling.intervalSeconds"),
    ("gpu<0", {"engine": {"resources": {"gpu": -1}}}, "spec.engine.resources.gpu"),
    ("memory", {"engine": {"resources": {"memory": "lots"}}}, "spec.engine.resources.memory"),
    ("tp 0", {"engine": {"tensorParallelSize": 0}}, "spec.engine.tensorParallelSize"),
    ("env name", {"engine": {"env": [{"name": "1 bad"}]}}, "spec.engine.env.0.name"),
    ("ttft 0", {"slo": {"interactive": {"ttftSeconds": 0}}}, "spec.slo.interactive.ttftSeconds"),
    ("percentile", {"slo": {"interactive": {"percentile": 100}}}, "spec.slo.interactive.percentile"),
    ("deadline", {"slo": {"batch": {"deadlineMinutes": 0}}}, "spec.slo.batch.deadlineMinutes"),
    ("trigger", {"migration": {"triggers": ["teleport"]}}, "spec.migration.triggers.0"),
    ("layers", {"memory": {"minLayersResident": 1.5}}, "spec.memory.minLayersResident"),
    ("gateway 0", {"gateway": {"replicas": 0}}, "spec.gateway.replicas"),
    ("max as string", {"replicas": {"max": "3"}}, "spec.replicas.max"),
    ("empty model", {"model": ""}, "spec.model"),
    (
        "secret without name",
        {"sidecar": {"tokenSecretRef": {"key": "k"}}},
        "spec.sidecar.tokenSecretRef.name",
    ),
]


@pytest.mark.parametrize(("changes", "field"), [row[1:] for row in INVALID], ids=[row[0] for row in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(changes: dict[str, Any], field: str) -> None:
    assert field in admit(with_spec(**changes))
    with pytest.raises(SpecError) as err:
        parse_spec(with_spec(**changes)["spec"])
    # The parser uses [i] for list items where the API server uses .i
    assert err.value.path.replace("[", ".").replace("]", "") == field
    assert field.rsplit(".", 1)[-1].strip("0123456789") in str(err.value)


def test_missing_model_is_named() -> None:
    obj = with_spec()
    del obj["spec"]["model"]
    assert "spec.model" in admit(obj)
    with pytest.raises(SpecError, match=r"^spec\.model: is required"):
        parse_spec(obj["spec"])


def test_crd_defaults_are_the_spec_defaults() -> None:
    defaulted = apply_defaults(SCHEMA, with_spec())["spec"]
    assert defaulted == spec_to_dict(parse_spec({"model": "org/model"}))
    # And the parser, given the API server's defaulted object, changes nothing.
    assert spec_to_dict(parse_spec(defaulted)) == defaulted


def _dataclass_schema_pairs(
    cls: type, schema: dict[str, Any], path: str
) -> Iterator[tuple[str, Any, Any, dict[str, Any], dict[str, Any]]]:
    """(path, Python type, dataclass field, its CRD schema, the parent object's schema)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = specmod.json_name(f.name)
        sub = schema["properties"].get(key)
        assert sub is not None, f"{path}.{key} is in slofleet/spec.py but not in the CRD"
        tp = hints[f.name]
        if get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in get_args(tp) if a is not type(None))
        yield f"{path}.{key}", tp, f, sub, schema
        if dataclasses.is_dataclass(tp):
            yield from _dataclass_schema_pairs(tp, sub, f"{path}.{key}")
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            yield from _dataclass_schema_pairs(get_args(tp)[0], sub["items"], f"{path}.{key}[]")
    assert set(schema["properties"]) == {specmod.json_name(f.name) for f in dataclasses.fields(cls)}, path


def test_crd_bounds_enums_and_patterns_are_the_spec_rules() -> None:
    pairs = list(_dataclass_schema_pairs(specmod.LLMServiceSpec, SPEC_SCHEMA, "spec"))
    assert len(pairs) > 40
    for path, tp, f, sub, parent in pairs:
        rules = dict(f.metadata)
        if rules.pop("quantity", False):
            assert sub.get("x-kubernetes-int-or-string") and sub["pattern"] == specmod.QUANTITY_PATTERN, path
        for key, value in rules.items():
            assert sub.get(key) == value, f"{path}: {key} is {value} in spec.py, {sub.get(key)} in the CRD"
        for key in ("minimum", "maximum", "minLength", "pattern", "exclusiveMinimum"):
            if key in sub and not (key == "pattern" and "quantity" in f.metadata):
                assert key in rules, f"{path}: the CRD has {key}, slofleet/spec.py does not"
        literal = get_args(get_args(tp)[0]) if get_origin(tp) is list else get_args(tp)
        if get_origin(tp) is Literal or (get_origin(tp) is list and get_origin(get_args(tp)[0]) is Literal):
            enum = sub["items"]["enum"] if get_origin(tp) is list else sub["enum"]
            assert list(literal) == enum, path
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert required == (specmod.json_name(f.name) in parent.get("required", [])), (
            f"{path}: required differs"
        )


def test_yaml_errors_carry_line_numbers(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("apiVersion: slofleet.io/v1alpha1\nkind: LLMService\nspec: {model: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_llmservice_file(bad_yaml)
    bad_field = tmp_path / "field.yaml"
    text = (ROOT / "deploy/samples/tiny-cpu.yaml").read_text().replace("min: 1, max: 2", "min: 3, max: 2")
    bad_field.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "min: 3" in row)
    with pytest.raises(
        SpecError, match=rf"field\.yaml:{line}: spec\.replicas\.min: must be <= spec\.replicas\.max"
    ):
        load_llmservice_file(bad_field)


def test_semantic_problems_name_the_field() -> None:
    spec = parse_spec({"model": "m", "engine": {"resources": {"gpu": 1}, "tensorParallelSize": 2}})
    assert [p.path for p in semantic_problems(spec)] == ["spec.engine.tensorParallelSize"]
    spec = parse_spec({"model": "/models/x"})
    assert [p.path for p in semantic_problems(spec)] == ["spec.modelVolume"]
    spec = parse_spec({"model": "/data/x", "modelVolume": {"claimName": "c"}})
    assert [p.path for p in semantic_problems(spec)] == ["spec.model"]
    with pytest.raises(SpecError, match="must not repeat"):
        parse_spec({"model": "m", "migration": {"triggers": ["drain", "drain"]}})

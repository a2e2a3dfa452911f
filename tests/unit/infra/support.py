"""What the infra tests share: the manifests, the CRD schemas kept as test data, and the check that
the pools the node types would form cover what the example specs ask for."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from jobs.contracts.pools import DEVICE_RESOURCE, pool_device, pool_of, satisfies
from workers.config import device_name

ROOT = Path(__file__).resolve().parents[3]
INFRA = ROOT / "infra"
DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = sorted((ROOT / "jobs" / "examples").glob("*.yaml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd_schema(plural: str) -> dict[str, Any]:
    """The v1 openAPIV3Schema of a KubeRay CRD (data/README.md says where it comes from), made strict:
    every object that lists its properties refuses others, as `kubectl apply --validate=strict`
    does, unless Kubernetes keeps unknown fields there. A misspelt field then fails here instead of
    being silently pruned by the API server."""
    schema = json.loads(gzip.decompress((DATA / f"ray.io_{plural}.v1.openapi.json.gz").read_bytes()))
    _close(schema)
    return schema


@cache
def crd_validator(plural: str) -> jsonschema.Draft7Validator:
    """A validator for ``crd_schema(plural)``, the schema itself checked once. Draft 7 is the JSON
    Schema closest to OpenAPI v3's subset; its ``x-kubernetes-*`` keys are ignored."""
    schema = crd_schema(plural)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


def spec_wants(spec: Mapping[str, Any]) -> list[str]:
    """The pools an example spec needs, each of them: the keys of ``resources.pools`` (workers per
    pool, a job spanning pools) when given, else its ``resources.device`` (default ``cpu``);
    ``cuda`` is read as ``gpu`` as the spec parser does."""
    resources = spec.get("resources") or {}
    names = list(resources.get("pools") or {}) or [resources.get("device", "cpu")]
    return [str(device_name(name)) for name in names]


def offers(resources: Mapping[str, float], pool: str) -> bool:
    """A node of ``pool`` with ``resources`` can hold one worker: a CPU and its device."""
    device = DEVICE_RESOURCE[pool_device(pool)]
    return resources.get("CPU", 0) >= 1 and (device is None or resources.get(device, 0) >= 1)


def node_type_pools(node_types: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Node type -> the pool its nodes join, for the types that can hold a worker."""
    pools = {name: pool_of(t["resources"], t.get("labels") or {}) for name, t in node_types.items()}
    return {name: pool for name, pool in pools.items() if offers(node_types[name]["resources"], pool)}


def unsatisfied_examples(pools: Iterable[str]) -> dict[str, list[str]]:
    """Example spec -> the pools it needs that no pool in ``pools`` satisfies, for each such spec."""
    pools = list(pools)
    missing = {}
    for path in EXAMPLES:
        unmet = [want for want in spec_wants(load_yaml(path)) if not any(satisfies(p, want) for p in pools)]
        if unmet:
            missing[path.name] = unmet
    return missing

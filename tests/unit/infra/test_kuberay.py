"""The KubeRay manifests (infra/k8s): the RayCluster and RayJob against KubeRay's CRD schemas, the
node types Ray's own KubeRay config reader derives from them (what the autoscaler scales), and the
service's Deployment, Service, Secret and volumes."""

from __future__ import annotations

import copy

import jsonschema
import pytest
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from orchestrator.settings import SettingsError, load_settings
from tests.unit.infra.support import (
    INFRA,
    ROOT,
    crd_validator,
    load_documents,
    load_yaml,
    node_type_pools,
    unsatisfied_examples,
)

K8S = INFRA / "k8s"
TOKEN_SECRET = "moe-orch-tokens"


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_yaml(K8S / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(K8S / "rayjob.yaml")


def _node_types(cluster_spec: dict) -> dict:
    """The autoscaler's node types for a RayCluster spec, as Ray's KubeRay reader derives them (it
    wants the namespace `kubectl apply -n` would give)."""
    cr = {"metadata": {"name": "test", "namespace": "default"}, "spec": copy.deepcopy(cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def _group(cluster_spec: dict, name: str) -> dict:
    return next(g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name)


def test_raycluster_matches_the_crd(raycluster):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    crd_validator("rayclusters").validate(raycluster)


def test_rayjob_matches_the_crd(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    crd_validator("rayjobs").validate(rayjob)


def test_crd_check_catches_a_misspelt_field(raycluster):
    bad = copy.deepcopy(raycluster)
    _group(bad["spec"], "gpu-a100")["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        crd_validator("rayclusters").validate(bad)


def test_autoscaling_token_auth_and_version(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_ray_derives_gpu_and_npu_node_types(raycluster):
    types = _node_types(raycluster["spec"])
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu-a100"]["resources"]["GPU"] == 1
    assert "NPU" not in types["gpu-a100"]["resources"]
    assert types["npu-910"]["resources"]["NPU"] == 8
    assert "GPU" not in types["npu-910"]["resources"]
    for name in ("gpu-a100", "npu-910"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]


def test_npu_group_declares_npu_beside_the_ascend_limit(raycluster):
    """Ray's reader maps only */gpu limits: without the explicit NPU resource the group offers none
    and the autoscaler would never start it for an npu job."""
    group = copy.deepcopy(_group(raycluster["spec"], "npu-910"))
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["huawei.com/Ascend910"] == "8"
    del group["rayStartParams"]["resources"]
    spec = {**raycluster["spec"], "workerGroupSpecs": [group]}
    assert "NPU" not in _node_types(spec)["npu-910"]["resources"]


def test_gpu_group_asks_kubernetes_for_nvidia_gpus(raycluster):
    container = _group(raycluster["spec"], "gpu-a100")["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_pools_cover_every_example(raycluster, rayjob):
    pools = node_type_pools(_node_types(raycluster["spec"]))
    assert pools == {"cpu": "cpu", "gpu-a100": "gpu-a100", "npu-910": "npu"}
    assert not unsatisfied_examples(pools.values())
    assert node_type_pools(_node_types(rayjob["spec"]["rayClusterSpec"])) == {"gpu": "gpu"}


def test_rayjob_runs_a_shipped_spec_on_its_own_token_cluster(rayjob):
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train --spec ")
    spec_file = spec["entrypoint"].split("--spec ")[1].split()[0]
    assert (ROOT / spec_file).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}


# The little of Kubernetes' own schemas these manifests rely on: kind, name and the spec keys used.
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}
_SCHEMAS = {
    ("apps/v1", "Deployment"): {"required": ["selector", "template"], "properties": {
        "replicas": {"const": 1}, "strategy": {"properties": {"type": {"const": "Recreate"}}},
        "template": {"type": "object", "required": ["metadata", "spec"], "properties": {
            "spec": {"type": "object", "required": ["containers"]}}}}},
    ("v1", "Service"): {"required": ["selector", "ports"]},
    ("v1", "PersistentVolumeClaim"): {"required": ["accessModes", "resources"]},
    ("v1", "Secret"): {},
}


@pytest.mark.parametrize("name", ["service.yaml", "secret.yaml", "storage.yaml"])
def test_plain_manifests_have_the_required_structure(name):
    for doc in load_documents(K8S / name):
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in _SCHEMAS, f"{name}: unexpected {key}"
        body = "stringData" if key[1] == "Secret" else "spec"
        schema = {"type": "object", "required": ["apiVersion", "kind", "metadata", body],
                  "properties": {"metadata": _META, body: {"type": "object", **_SCHEMAS[key]}}}
        jsonschema.validate(doc, schema)


@pytest.fixture(scope="module")
def service_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in load_documents(K8S / "service.yaml")}


def test_service_gets_both_tokens_from_the_secret(service_docs):
    (container,) = service_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ORCH_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": "api_token"}
    # KubeRay reads the Ray token from the same Secret's `auth_token` key.
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": TOKEN_SECRET, "key": "auth_token"}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "value" not in env["ORCH_API_TOKEN"] and "value" not in env["RAY_AUTH_TOKEN"]
    secret = load_documents(K8S / "secret.yaml")[0]
    assert secret["metadata"]["name"] == TOKEN_SECRET
    assert set(secret["stringData"]) == {"auth_token", "api_token"}


def test_service_points_at_the_rayclusters_head(service_docs, raycluster):
    (container,) = service_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ADDRESS"] == f"http://{raycluster['metadata']['name']}-head-svc:8265"
    assert env["ORCH_JOBS_DIR"].startswith("/shared/")
    assert container["command"] == ["orch", "up"]


def test_service_selects_the_deployments_pods(service_docs):
    pod_labels = service_docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = service_docs["Service"]["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert service_docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = service_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service_docs["Service"]["spec"]["ports"]} <= ports


def test_placeholder_api_token_fails_closed():
    """Applying secret.yaml unedited leaves a service that refuses to start."""
    secret = load_documents(K8S / "secret.yaml")[0]
    with pytest.raises(SettingsError, match="ORCH_API_TOKEN"):
        load_settings(api_token=secret["stringData"]["api_token"], local=False)


def test_every_volume_claim_exists():
    claims = {d["metadata"]["name"] for d in load_documents(K8S / "storage.yaml")}
    for name in ("raycluster.yaml", "rayjob.yaml", "service.yaml"):
        text = (K8S / name).read_text()
        used = {line.split("claimName:")[1].strip(" }") for line in text.splitlines() if "claimName:" in line}
        assert used and used <= claims, f"{name} uses {used - claims}"

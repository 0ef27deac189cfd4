"""deploy/: every kustomization renders (kubectl's kustomize) and every resource validates offline against the
Kubernetes 1.37 schemas (kubernetes-validate) and KServe's API types (the kserve SDK); the manifests agree with
the image (user, paths, ports, readiness probe) and with TorchServe (config keys, metric names)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import kserve_schema
from vision_attribution.clients.readiness import parse_properties

REPO = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
KUSTOMIZATIONS = ("plain", "plain-gpu", "kserve", "kserve-gpu")


def render(name: str) -> list[dict]:
    done = subprocess.run([str(KUBECTL), "kustomize", str(REPO / "deploy" / name)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(doc: dict) -> None:
    """Raise when `doc` does not match its kind's schema (unknown fields included)."""
    kserve_kind = kserve_schema.KINDS.get((doc["apiVersion"], doc["kind"]))
    if kserve_kind:
        kserve_schema.validator(kserve_kind).validate(doc)
    else:
        kubernetes_validate.validate(doc, kserve_schema.KUBERNETES_VERSION, strict=True)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [doc for doc in docs if doc["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_resource_matches_its_schema(rendered, name):
    kinds = sorted(doc["kind"] for doc in rendered[name])
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"] if name.startswith("plain") else (
        ["ConfigMap", "InferenceService", "PersistentVolumeClaim", "ServingRuntime"])
    assert kinds == expected
    for doc in rendered[name]:
        validate(doc)


def test_the_validators_refuse_a_misspelt_field(rendered):
    deployment = by_kind(render("plain"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    service = by_kind(render("kserve"), "InferenceService")
    service["spec"]["predictor"]["model"]["storageURI"] = service["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        validate(service)
    runtime = by_kind(render("kserve"), "ServingRuntime")
    runtime["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["8Gi"]
    with pytest.raises(jsonschema.ValidationError):
        validate(runtime)


def dockerfile_uid() -> int:
    return int(re.search(r"useradd --uid (\d+)", (REPO / "Dockerfile").read_text()).group(1))


@pytest.mark.parametrize("name", ("plain", "plain-gpu"))
def test_the_deployment_matches_the_image_and_its_config(rendered, name):
    docs = rendered[name]
    pod = by_kind(docs, "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    config = parse_properties(by_kind(docs, "ConfigMap")["data"]["config.properties"])
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TS_CONFIG_FILE"] == f"{mounts['config']}/config.properties"
    assert config["model_store"] == mounts["model-store"]
    assert mounts["home"] == "/home/model-server" and pod["spec"]["securityContext"]["runAsUser"] == dockerfile_uid()
    # readiness: every model's workers READY, asked on the loopback management API; liveness: /ping
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["exec"]["command"] == ["python", "-m", "vision_attribution.clients.readiness"]
    assert importlib.util.find_spec("vision_attribution.clients.readiness") is not None
    assert config["management_address"].startswith("http://127.0.0.1:") and config["disable_token_authorization"] == "true"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert config["inference_address"].endswith(f":{ports['http']}") and config["metrics_address"].endswith(f":{ports['metrics']}")
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"]) and config["metrics_mode"] == "prometheus"
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {"http", "metrics"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu, container["image"]) == (("1", "vision-attribution:cuda") if name.endswith("gpu") else (None, "vision-attribution:cpu"))
    claim = {volume["name"]: volume for volume in pod["spec"]["volumes"]}["model-store"]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]


def test_the_hpa_metric_is_what_prometheus_adapter_serves_from_torchserve_metrics(rendered):
    hpa = by_kind(rendered["plain"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(rendered["plain"], "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load((REPO / "deploy" / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[metric["pods"]["metric"]["name"]]
    import ts

    torchserve_metrics = (Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text()
    for name in re.findall(r"\b(ts_\w+)\{", rule["metricsQuery"]) + re.findall(r"^(ts_\w+)\{", rule["seriesQuery"]):
        assert f"name: {name}" in torchserve_metrics, f"{name} is not a TorchServe 0.12 metric"


@pytest.mark.parametrize("name", ("kserve", "kserve-gpu"))
def test_the_inference_service_runs_torchserve_with_the_v2_envelope(rendered, name):
    docs = rendered[name]
    runtime, service = by_kind(docs, "ServingRuntime"), by_kind(docs, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in [entry["name"] for entry in runtime["spec"]["supportedModelFormats"]]
    assert model["storageUri"] == "pvc://" + by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    container = runtime["spec"]["containers"][0]
    config_map = by_kind(docs, "ConfigMap")
    assert {volume["name"]: volume for volume in runtime["spec"]["volumes"]}["torchserve-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    config = parse_properties(config_map["data"]["config.properties"])
    assert config["service_envelope"] == "kservev2" and config["disable_token_authorization"] == "true"
    arguments = dict(argument.split("=", 1) for argument in container["args"] if "=" in argument)
    assert arguments["--model-store"] == config["model_store"] == "/mnt/models"  # where KServe mounts storageUri
    config_mount = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}["torchserve-config"]
    assert arguments["--ts-config"] == f"{config_mount}/config.properties" == {e["name"]: e["value"] for e in container["env"]}["TS_CONFIG_FILE"]
    assert config["inference_address"].endswith(f":{container['ports'][0]['containerPort']}")
    assert container["readinessProbe"]["exec"]["command"] == ["python", "-m", "vision_attribution.clients.readiness"]
    assert container["securityContext"]["runAsUser"] == dockerfile_uid()
    gpu = model["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu, container["image"]) == (("1", "vision-attribution:cuda") if name.endswith("gpu") else (None, "vision-attribution:cpu"))

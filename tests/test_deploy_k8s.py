"""Offline validation of deploy/: the Kubernetes manifests and the Ray Serve config.

* Kubernetes' own kinds (Deployment, Service, HorizontalPodAutoscaler), and every pod template
  or container embedded in a custom resource, against the Kubernetes JSON schemas that PyPI's
  `kubernetes-validate` ships, in strict mode (unknown fields are errors).
* KServe's InferenceService: its fields against the KServe Python SDK's generated models (the
  CRD's OpenAPI types: unknown fields and wrong kinds of value are errors), its containers as
  above. No package ships KubeRay's CRD schema, so the RayService gets structural checks of our
  own; its serveConfigV2, like deploy/ray-serve.yaml, is validated with Ray Serve's own schema
  (`ray.serve.schema.ServeDeploySchema`) and its application built from its args.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
SERVE_CONFIG = ROOT / "deploy" / "ray-serve.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
PORT = 8000
GRPC_PORT = 8001  # EQUISERVE_GRPC_PORT: the Open Inference Protocol over gRPC
PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.ray_serve:proxy_middlewares")


def documents(name: str) -> list[dict[str, Any]]:
    with (K8S / name).open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    docs = documents(name)
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object per kind in each file"
    return kinds


def strict(obj: dict[str, Any]) -> None:
    """Kubernetes' JSON schema of the object's kind, unknown fields refused."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def strict_pod_template(template: dict[str, Any]) -> None:
    strict({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def strict_containers(containers: list[dict[str, Any]], volumes: list[dict[str, Any]] | None = None) -> None:
    spec: dict[str, Any] = {"containers": containers, **({"volumes": volumes} if volumes else {})}
    strict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def drain_timeout(container: dict[str, Any]) -> float:
    return float(env_of(container).get("EQUISERVE_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))


def test_validation_refuses_what_it_should() -> None:
    """The strict check can fail: a misspelt field and a wrong type are errors."""
    deployment = by_kind("equiserve.yaml")["Deployment"]
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        strict(bad)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        strict(bad)
    with pytest.raises(ValueError, match="unknown field"):
        check_openapi({"predictor": {"minReplica": 1}}, "V1beta1InferenceServiceSpec")


# -- the plain server: Deployment + Service + HPA ----------------------------------------------------


def test_plain_server_manifests_validate() -> None:
    kinds = by_kind("equiserve.yaml")
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for obj in kinds.values():
        strict(obj)


def test_plain_server_probes_drain_and_resources() -> None:
    kinds = by_kind("equiserve.yaml")
    deployment, service, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"].split(":")[0] == "equiserve"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT, "grpc": GRPC_PORT} and env_of(container)["EQUISERVE_PORT"] == str(PORT)
    assert env_of(container)["EQUISERVE_GRPC_PORT"] == str(GRPC_PORT)
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "model loading needs minutes"
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain_timeout(container)
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    assert env_of(container)["EQUISERVE_TORCH_THREADS"] == str(resources["requests"]["cpu"])
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/home/equiserve/.cache"} <= mounts
    # the selectors meet
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports) | set(ports.values())
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


# -- Ray Serve config, standalone and inside the RayService -----------------------------------------


def check_serve_config(config: dict[str, Any]) -> None:
    """Ray Serve's own schema, unknown keys refused, the application built from its args."""
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from app.ray_serve import APP_NAME, build, deployment_options

    ServeDeploySchema(**config)
    for part, schema in ((config, ServeDeploySchema), (config["http_options"], HTTPOptionsSchema)):
        assert set(part) <= set(schema.model_fields), set(part) - set(schema.model_fields)
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "app.ray_serve:build" and app["route_prefix"] == "/"
    settings = Settings(**app["args"])  # every arg is a setting
    build(app["args"])  # the builder accepts them (no cluster needed to bind)
    (deployment,) = app["deployments"]
    assert set(deployment) <= set(DeploymentSchema.model_fields), set(deployment) - set(DeploymentSchema.model_fields)
    assert deployment["name"] == APP_NAME == deployment_options(settings)["name"]
    assert deployment["max_ongoing_requests"] >= settings.max_batch_size, "batches would never fill"
    assert deployment["graceful_shutdown_timeout_s"] == settings.drain_timeout_s
    assert deployment["ray_actor_options"]["num_cpus"] == settings.replica_cpus
    assert config["http_options"]["port"] == PORT


def test_serve_config_file_validates() -> None:
    check_serve_config(yaml.safe_load(SERVE_CONFIG.read_text()))


def test_rayservice() -> None:
    import ray

    service = by_kind("rayservice.yaml")["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    assert set(service["spec"]) <= {
        "serveConfigV2",
        "rayClusterConfig",
        "upgradeStrategy",
        "serviceUnhealthySecondThreshold",
    }
    check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, "the cluster's Ray must be the one the image installs"
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's rayStartParams is a map of strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        strict_pod_template(group["template"])
        for container in group["template"]["spec"]["containers"]:
            assert PROXY_CALLBACK in env_of(container).items(), "every node's proxy re-sends lost requests"
            assert container["resources"]["limits"]["memory"]
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, PORT, 8080} <= head_ports
    for worker in cluster["workerGroupSpecs"]:
        assert re.fullmatch(r"[a-z0-9-]+", worker["groupName"])
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
        grace = worker["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["drain_timeout_s"]


# -- KServe -------------------------------------------------------------------------------------------


def _model_class(name: str) -> Any:
    import kserve.models
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(name)


def check_openapi(value: Any, type_name: str, path: str = "spec") -> None:
    """``value`` (YAML, camelCase) against an OpenAPI-generated model of the KServe SDK or of the
    Kubernetes client: every field known, every value of its declared kind."""
    if type_name.lower().startswith("list["):  # the SDKs write list[...] and List[...]
        assert isinstance(value, list), f"{path}: a list"
        for i, item in enumerate(value):
            check_openapi(item, type_name[5:-1], f"{path}[{i}]")
        return
    if type_name.lower().startswith(("dict(", "dict[")):
        assert isinstance(value, dict), f"{path}: a map"
        return
    primitives: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
    if type_name in primitives:
        assert isinstance(value, primitives[type_name]), f"{path}: a {type_name}, not {value!r}"
        return
    if type_name in ("object", "datetime"):  # quantities, int-or-string, timestamps
        return
    model = _model_class(type_name)
    assert isinstance(value, dict), f"{path}: an object ({type_name})"
    fields = {yaml_name: attr for attr, yaml_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise ValueError(f"{path}: unknown field {key!r} for {type_name}")
        check_openapi(item, model.openapi_types[fields[key]], f"{path}.{key}")


def test_inferenceservice() -> None:
    isvc = by_kind("inferenceservice.yaml")["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    check_openapi(isvc["spec"], "V1beta1InferenceServiceSpec")
    predictor = isvc["spec"]["predictor"]
    strict_containers(predictor["containers"], predictor.get("volumes"))
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert predictor["terminationGracePeriodSeconds"] > drain_timeout(container)
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(PORT)

"""The Kubernetes manifests: every overlay renders with kustomize and validates
against the Kubernetes API schemas; custom resources have what they need; ports,
probes, grace period and settings agree with the server's own code."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from rnnserve.protos.headers import SESSION_HEADER
from rnnserve.server.app import HELD_SERVICES, SERVICE
from rnnserve.server.metrics import Limits, Metrics, ServingCollector
from rnnserve.server.settings import Settings
from rnnserve.server.workers import SCRAPE_BUDGET_S, STOP_MARGIN_S

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30.0", "1.32.0")  # the oldest supported and kubectl's own
MARGIN_S = 5  # terminationGracePeriodSeconds - preStop sleep - drain grace


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/k8s")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(K8S / "overlays" / request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(tool), "--strict", "-k", version, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_validates_strictly(rendered, version, tmp_path) -> None:
    overlay, docs = rendered
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    run = validate(path, version)
    assert run.returncode == 0, run.stdout + run.stderr
    builtin = {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
               "HorizontalPodAutoscaler", "NetworkPolicy"}
    assert {d["kind"] for d in docs} == builtin | {"ServiceMonitor"}
    passed = run.stdout.count(" passed for resource ")
    assert passed == sum(d["kind"] in builtin for d in docs), run.stdout


def test_the_validator_is_strict(rendered, tmp_path) -> None:
    """A misspelt field fails validation, so the passes above mean something."""
    _, docs = rendered
    broken = copy.deepcopy(one(docs, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert validate(path, K8S_VERSIONS[0]).returncode != 0


def settings_of(docs: list[dict[str, Any]]) -> Settings:
    data = one(docs, "ConfigMap")["data"]
    fields = Settings.model_fields
    for key in data:
        assert key.startswith("RNNSERVE_") and key[9:].lower() in fields, key
    return Settings(**{k[9:].lower(): v for k, v in data.items()})


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_ports_probes_and_settings_agree_with_the_server(rendered) -> None:
    overlay, docs = rendered
    s = settings_of(docs)
    defaults = Settings()
    assert (s.grpc_port, s.metrics_port) == (defaults.grpc_port, defaults.metrics_port)
    assert s.host == "0.0.0.0" and s.device == ("cuda" if overlay == "gpu" else "cpu")
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": s.grpc_port, "metrics": s.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == s.grpc_port, probe
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE
    # with RNNSERVE_WORKERS readiness waits for every worker (the service is held until
    # then), startup and liveness only for one: --worker-start-s bounds one start
    assert SERVICE in HELD_SERVICES
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["grpc"].get("service", "") not in HELD_SERVICES, probe
    assert c["envFrom"][0]["configMapRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]], p
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        for p in rule["ports"]:
            assert p["port"] in ports
    # one thread per CPU the pod is given
    assert s.intra_op_threads == int(c["resources"]["limits"]["cpu"])


def test_grace_period_covers_the_drain(rendered) -> None:
    _, docs = rendered
    s = settings_of(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == sleep + s.shutdown_grace_s + MARGIN_S
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > sleep + s.shutdown_grace_s
    # with RNNSERVE_WORKERS, the supervisor (SIGTERM after the preStop sleep) kills a
    # worker that outlasts the drain, and exits, before the kubelet's SIGKILL
    assert sleep + s.shutdown_grace_s + STOP_MARGIN_S + 1 <= pod["terminationGracePeriodSeconds"]


def test_a_worker_hung_while_loading_is_named_before_the_startup_probe_gives_up(
        rendered) -> None:
    """With RNNSERVE_WORKERS the supervisor kills a worker not serving after
    --worker-start-s and exits naming it: that must come before the kubelet's restart
    for a failed startupProbe, which says nothing of which worker hung."""
    _, docs = rendered
    s = settings_of(docs)
    startup = container(docs)["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert s.worker_start_s + 10 <= window, (s.worker_start_s, window)


def test_the_autoscaler_owns_the_replica_count(rendered) -> None:
    """A Deployment that an HPA scales sets no replicas: each `kubectl apply` (and each
    settings rollout) would set the fleet back to that number."""
    _, docs = rendered
    deployment = one(docs, "Deployment")
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs
              if d["kind"] == "HorizontalPodAutoscaler"
              and d["spec"]["scaleTargetRef"]["kind"] == "Deployment"}
    assert deployment["metadata"]["name"] in scaled
    assert "replicas" not in deployment["spec"]


def test_pod_runs_as_the_images_non_root_user(rendered) -> None:
    _, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    sc = container(docs)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    dockerfile = (K8S.parent / "docker" / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile


def test_service_monitor_scrapes_the_metrics_port_of_one_service(rendered) -> None:
    _, docs = rendered
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    match = sm["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"
                and match.items() <= d["metadata"]["labels"].items()]
    assert len(services) == 1 and services[0]["spec"].get("clusterIP") != "None"
    names = {p["name"] for p in services[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in names and ep["path"] == "/metrics"
        # with RNNSERVE_WORKERS the supervisor leaves out a worker that has not answered
        # within SCRAPE_BUDGET_S: the pod's scrape ends well within the timeout, instead
        # of failing whole for one hung worker
        timeout = ep["scrapeTimeout"]
        assert timeout.endswith("s") and timeout[:-1].isdigit(), timeout
        assert SCRAPE_BUDGET_S <= int(timeout[:-1]) / 2, (SCRAPE_BUDGET_S, timeout)


def test_autoscaler_metric_exists_and_scales_before_eviction(rendered) -> None:
    overlay, docs = rendered
    s = settings_of(docs)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]
    served = {r["name"]["as"]: r["seriesQuery"].split("{")[0] for r in adapter}
    assert pods["metric"]["name"] in served
    # the series the adapter reads are ones the server exports
    registry = CollectorRegistry()
    Metrics(registry)
    registry.register(ServingCollector(lambda: [], lambda: {}, Limits(1, 1, 1, 1)))
    exported = {m.name for m in registry.collect()}
    for series in served.values():
        assert series.removesuffix("_bucket") in exported, series
    if pods["metric"]["name"] == "rnnserve_active_sessions":
        assert float(pods["target"]["averageValue"]) < s.max_sessions


def test_the_cpu_target_is_one_a_gpu_pod_can_reach(rendered) -> None:
    """On a GPU the model runs on the card, and one server process's own work runs on
    one core at a time (the GIL): an HPA CPU target above about one of the pod's CPUs
    per worker could never fire."""
    _, docs = rendered
    s = settings_of(docs)
    if s.device != "cuda":
        pytest.skip("a CPU pod: onnxruntime's threads use its every core")
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    (cpu,) = [m["resource"] for m in hpa["metrics"] if m["type"] == "Resource"
              and m["resource"]["name"] == "cpu"]
    cpus = int(container(docs)["resources"]["limits"]["cpu"])
    assert cpu["target"]["averageUtilization"] / 100 * cpus <= s.workers, (cpu, cpus)


def test_gpu_overlay_asks_for_a_gpu_node(rendered) -> None:
    overlay, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    limits = container(docs)["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert container(docs)["image"].endswith("-cuda")
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_istio_component_hashes_on_the_clients_session_header(tmp_path, overlay) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(K8S / "routing", tmp_path)]}))
    docs = kustomize(tmp_path)
    dr = one(docs, "DestinationRule")
    assert dr["apiVersion"] == "networking.istio.io/v1"
    assert dr["spec"]["host"] == one(docs, "Service", "rnnserve")["metadata"]["name"]
    lb = dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    assert lb["httpHeaderName"] == SESSION_HEADER
    # each session's stream is one request for its whole life: a client proxy's cap on
    # the requests in flight to the host (Istio's default 2^32-1) must hold the fleet
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    (pods,) = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    fleet = hpa["maxReplicas"] * float(pods["target"]["averageValue"])
    http = dr["spec"]["trafficPolicy"].get("connectionPool", {}).get("http", {})
    assert http.get("http2MaxRequests", 2**32 - 1) >= fleet, (http, fleet)
    # the sidecar outlives the preStop sleep, the drain and the supervisor's stop margin
    # (it gets SIGTERM with the server), and is gone by the kubelet's SIGKILL
    pod = one(docs, "Deployment")["spec"]["template"]
    proxy = yaml.safe_load(pod["metadata"]["annotations"]["proxy.istio.io/config"])
    drain = proxy["terminationDrainDuration"]
    assert drain.endswith("s") and drain[:-1].isdigit(), drain
    sleep = container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = settings_of(docs).shutdown_grace_s
    assert (sleep + grace + STOP_MARGIN_S <= int(drain[:-1])
            <= pod["spec"]["terminationGracePeriodSeconds"])

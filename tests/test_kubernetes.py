"""Kubernetes manifests (k8s/): each overlay renders with `kubectl kustomize`, every object of a built-in
kind loads into the `kubernetes` client's typed model with no unknown field, the CRD objects (ServiceMonitor,
InferencePool) match a schema of the fields they use, and what the manifests say about the server agrees with the
server: probe paths against server/app.py's routes, ports and arguments against `trimode serve`'s parser and the
preset they load, the grace period against the drain's shutdown_timeout, and the autoscaling and routing metric
names against what ServerMetrics exports. Nothing here starts a cluster or a server.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import promql_parser
import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s_models

from server.cli import build_parser, overrides_from
from server.config import load_config
from server.metrics import ServerMetrics
from server.middleware import OPEN_PATHS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")

SERVED = ("overlays/cpu", "overlays/gpu", "overlays/gpu-inference-pool")  # kustomizations that run the server
TARGETS = (*SERVED, "models")
BASE_KINDS = {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}
EXPECTED_KINDS = {
    "overlays/cpu": BASE_KINDS,
    "overlays/gpu": BASE_KINDS,
    "overlays/gpu-inference-pool": BASE_KINDS | {"InferencePool"},
    "models": {"PersistentVolumeClaim"},
}
# terminationGracePeriodSeconds >= preStop sleep + shutdown_timeout + this: the engine process's exit and
# uvicorn's shutdown after the drain's deadline (docs/deployment.md, "Kubernetes")
GRACE_MARGIN_S = 10
TEST_KEY = "sk-kubernetes-test"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(target: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/<target>` prints (a fresh copy: tests may not share mutations)."""
    return copy.deepcopy(list(_render(target)))


def one(objs: list[dict], kind: str, name_prefix: str = "trimode") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: list[dict]) -> dict:
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trimode"]
    return containers[0]


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def resolve_port(ctr: dict, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port name) as the container port number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert port in named, f"port name {port!r} is not a container port ({sorted(named)})"
    return named[port]


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every `@app.<method>("<path>")` route in server/app.py, read without building the app."""
    tree = ast.parse((ROOT / "server" / "app.py").read_text())
    routes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                        and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    routes.add((dec.func.attr.upper(), dec.args[0].value))
    return routes


@functools.cache
def exported_metrics() -> dict[str, str]:
    """Metric family -> type, from a ServerMetrics registry rendered as Prometheus text."""
    text = ServerMetrics("m").render().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))


def mounts_by_volume(ctr: dict) -> dict[str, dict]:
    return {m["name"]: m for m in ctr["volumeMounts"]}


def volumes(objs: list[dict]) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec(objs)["volumes"]}


def serve_args(objs: list[dict]) -> list[str]:
    ctr = container(objs)
    # no `command`: the image's ENTRYPOINT (docker/entrypoint.sh) runs, and it passes arguments that start with '-'
    # to `trimode serve` (anything else would be run as a command instead)
    assert "command" not in ctr, "the container must keep the image's entrypoint"
    args = ctr["args"]
    assert args and args[0].startswith("-"), f"the entrypoint runs {args[:1]} as a command, not as serve flags"
    return args


def mounted_file(objs: list[dict], path: str) -> tuple[dict, dict, str]:
    """(volume, mount, file name inside the volume) of the container path `path`."""
    ctr = container(objs)
    for name, mount in mounts_by_volume(ctr).items():
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            return volumes(objs)[name], mount, path[len(prefix):]
    raise AssertionError(f"{path} is on no volume mount of the container")


def effective_config(objs: list[dict], tmp_path: Path) -> tuple[Any, Any, Any]:
    """(args namespace, EngineConfig, ServerConfig) the pod's `trimode serve` would run with: its arguments parsed
    by the real parser (in the pod's environment: no TRIMODE_API_KEY), the preset taken from the ConfigMap the
    `--config` path is mounted from, and the `--api-key-file` path standing for a file holding TEST_KEY, as the
    Secret's mount does."""
    with mock.patch.dict(os.environ):
        os.environ.pop("TRIMODE_API_KEY", None)
        args = build_parser().parse_args(["serve", *serve_args(objs)])
    volume, _, key = mounted_file(objs, args.config)
    assert "configMap" in volume, f"--config {args.config} is not on a ConfigMap volume"
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key} (--config {args.config})"
    preset = tmp_path / key
    preset.write_text(cm["data"][key])
    overrides = overrides_from(args)
    if args.api_key_file is not None:
        key_file = tmp_path / "api-key"
        key_file.write_text(TEST_KEY + "\n")
        overrides["server"]["api_key_file"] = str(key_file)
    engine_cfg, server_cfg = load_config(preset, overrides)
    return args, engine_cfg, server_cfg


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two JSON-like values first differ, for a readable assertion message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key} (dropped: not a field of the model)"
            if key not in a:
                return f"{path}.{key} (added by the model)"
            diff = first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return ""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} != {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return ""
    return "" if a == b and type(a) is type(b) else f"{path} ({a!r} != {b!r})"


def model_class(obj: dict) -> str | None:
    """The kubernetes client's model class for a built-in kind (`apps/v1` Deployment -> V1Deployment), else None."""
    version = obj["apiVersion"].rsplit("/", 1)[-1]
    name = version[0].upper() + version[1:] + obj["kind"]
    return name if hasattr(k8s_models, name) else None


# A schema of the fields these manifests use in the CRD kinds, as the CRDs define them: a dict is an object whose
# keys must all be listed (a key ending in "!" is required), [s] a list of s, a frozenset an enum of strings,
# LABELS a string-to-string map, DURATION a Prometheus duration, a type a scalar of that type.
LABELS = "labels"
DURATION = "duration"
METADATA = {"name!": str, "labels": LABELS, "namespace": str}
CRD_SCHEMAS: dict[tuple[str, str], dict] = {
    # monitoring.coreos.com/v1 (prometheus-operator)
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "apiVersion!": str, "kind!": str, "metadata!": METADATA,
        "spec!": {
            "selector!": {"matchLabels!": LABELS},
            "endpoints!": [{"port!": str, "path": str, "interval": DURATION, "scrapeTimeout": DURATION}],
        },
    },
    # inference.networking.k8s.io/v1 (Gateway API Inference Extension v1.x, config/crd/bases)
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "apiVersion!": str, "kind!": str, "metadata!": METADATA,
        "spec!": {
            "selector!": {"matchLabels!": LABELS},
            "targetPorts!": [{"number!": int}],
            "appProtocol": frozenset({"http", "kubernetes.io/h2c"}),
            "endpointPickerRef": {
                "group": str, "kind": str, "name!": str,
                # required when kind is Service (the default)
                "port!": {"number!": int},
                "failureMode": frozenset({"FailOpen", "FailClose"}),
            },
        },
    },
}


def schema_errors(value: Any, schema: Any, path: str) -> list[str]:
    if schema is LABELS:
        ok = isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in value.items())
        return [] if ok else [f"{path}: expected a non-empty string map, got {value!r}"]
    if schema is DURATION:
        return [] if isinstance(value, str) and re.fullmatch(r"(\d+(ms|s|m|h))+", value) else [
            f"{path}: expected a duration such as 15s, got {value!r}"]
    if isinstance(schema, frozenset):
        return [] if value in schema else [f"{path}: {value!r} is not one of {sorted(schema)}"]
    if isinstance(schema, list):
        if not isinstance(value, list) or not value:
            return [f"{path}: expected a non-empty list, got {value!r}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        fields = {k.rstrip("!"): s for k, s in schema.items()}
        errors = [f"{path}.{k}: unknown field" for k in value if k not in fields]
        errors += [f"{path}.{k[:-1]}: required" for k in schema if k.endswith("!") and k[:-1] not in value]
        for key, item in value.items():
            if key in fields:
                errors += schema_errors(item, fields[key], f"{path}.{key}")
        return errors
    if schema is int:
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: expected an integer"]
    return [] if isinstance(value, schema) else [f"{path}: expected {schema.__name__}, got {value!r}"]


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", text))


# ----------------------------------------------------------------------------------------------------------------
# rendering and schemas
# ----------------------------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_each_kustomization_renders_the_expected_kinds(target: str) -> None:
    objs = render(target)
    assert {o["kind"] for o in objs} == EXPECTED_KINDS[target]
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for obj in objs:
        assert "namespace" not in obj["metadata"], "namespace is left to `kubectl apply -n` / the current context"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "trimode", obj["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_built_in_kinds_load_into_the_typed_models_with_no_unknown_field(target: str) -> None:
    api = ApiClient()
    checked = 0
    for obj in render(target):
        cls = model_class(obj)
        if cls is None:
            assert (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS, f"{obj['kind']}: neither built in nor known"
            continue
        # a missing required field or a wrongly typed value raises; an unknown field is dropped by the model, so
        # the round trip differs from the input
        model = api._ApiClient__deserialize(copy.deepcopy(obj), cls)
        back = api.sanitize_for_serialization(model)
        diff = first_difference(obj, back)
        assert not diff, f"{obj['kind']} {obj['metadata']['name']}: {diff}"
        checked += 1
    assert checked >= 1


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_crd_kinds_use_only_fields_their_crds_define(target: str) -> None:
    crds = [o for o in render(target) if model_class(o) is None]
    assert crds
    for obj in crds:
        schema = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
        errors = schema_errors(obj, schema, obj["kind"])
        assert not errors, errors


def test_schema_checker_catches_an_unknown_field_a_missing_field_and_a_bad_enum() -> None:
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "FailOpen"}}}
    schema = CRD_SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")]
    assert schema_errors(pool, schema, "p") == []
    bad = copy.deepcopy(pool)
    bad["spec"]["targetPortNumber"] = 8000  # the v1alpha2 field
    del bad["spec"]["endpointPickerRef"]["port"]
    bad["spec"]["endpointPickerRef"]["failureMode"] = "Open"
    errors = schema_errors(bad, schema, "p")
    assert any("targetPortNumber: unknown field" in e for e in errors)
    assert any("endpointPickerRef.port: required" in e for e in errors)
    assert any("'Open' is not one of" in e for e in errors)


def test_typed_round_trip_catches_an_unknown_field() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"ports": [{"port": 8000, "targetPort": "http", "portName": "http"}]}}
    api = ApiClient()
    back = api.sanitize_for_serialization(api._ApiClient__deserialize(copy.deepcopy(svc), model_class(svc)))
    assert "spec.ports[0].portName" in first_difference(svc, back)


# ----------------------------------------------------------------------------------------------------------------
# the manifests against the server
# ----------------------------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", ("overlays/cpu", "overlays/gpu"))
def test_overlay_presets_are_the_repository_presets(target: str) -> None:
    cm = one(render(target), "ConfigMap", "trimode-config")
    assert cm["data"], "the preset ConfigMap is empty"
    for name, text in cm["data"].items():
        preset = ROOT / "configs" / name
        assert preset.exists(), f"{name} is not a preset in configs/"
        assert text == preset.read_text(), f"k8s/{target}/{name} differs from configs/{name}: copy it again"


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_args_are_serve_flags_and_the_server_listens_on_the_container_port(target: str, tmp_path: Path) -> None:
    objs = render(target)
    args, _, server_cfg = effective_config(objs, tmp_path)
    ctr = container(objs)
    assert server_cfg.host == "0.0.0.0", "the server must listen on the pod's address for probes and the Service"
    assert resolve_port(ctr, "http") == server_cfg.port
    svc = one(objs, "Service")
    assert svc["spec"]["selector"].items() <= one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert [resolve_port(ctr, p["targetPort"]) for p in svc["spec"]["ports"]] == [server_cfg.port]
    # the API key comes from a file on the Secret volume, never from the command line or the environment
    flags = serve_args(objs)
    assert "--api-key" not in flags and not any(e["name"] == "TRIMODE_API_KEY" for e in ctr.get("env", []))
    assert server_cfg.api_key == TEST_KEY
    volume, mount, item = mounted_file(objs, args.api_key_file)
    assert mount["readOnly"] is True
    assert "secret" in volume and item in {i["path"] for i in volume["secret"]["items"]}


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_probes_use_the_servers_health_and_ready_routes(target: str, tmp_path: Path) -> None:
    objs = render(target)
    _, _, server_cfg = effective_config(objs, tmp_path)
    ctr = container(objs)
    routes = app_routes()
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = ctr[probe]["httpGet"]
        assert get["path"] == path and ("GET", path) in routes, f"{probe}: {get['path']} vs routes {sorted(routes)}"
        assert resolve_port(ctr, get["port"]) == server_cfg.port, probe
        # a probe cannot hold the API key: its path must be one the key does not guard
        assert path in OPEN_PATHS, f"{probe}: {path} needs the API key"
    # /ready runs a forward bounded by probe_timeout: the kubelet waits longer, so the server's own 503 arrives
    assert ctr["readinessProbe"]["timeoutSeconds"] > server_cfg.probe_timeout
    # liveness starts only after startup: a slow model load is never killed by it
    assert ctr["startupProbe"]["periodSeconds"] * ctr["startupProbe"]["failureThreshold"] >= 300
    monitor = one(objs, "ServiceMonitor")
    port_names = {p["name"] for p in one(objs, "Service")["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and ("GET", endpoint["path"]) in routes
        assert endpoint["path"] in OPEN_PATHS, "the scrape carries no API key"
        assert duration_s(endpoint["scrapeTimeout"]) <= duration_s(endpoint["interval"])
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objs, "Service")["metadata"]["labels"].items()


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_grace_period_covers_the_prestop_sleep_and_the_drain(target: str, tmp_path: Path) -> None:
    objs = render(target)
    _, _, server_cfg = effective_config(objs, tmp_path)
    command = container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, shlex.join(command)
    sleep_s = float(command[1])
    grace = pod_spec(objs)["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + server_cfg.shutdown_timeout + GRACE_MARGIN_S, (
        f"grace {grace} s < preStop {sleep_s} + shutdown_timeout {server_cfg.shutdown_timeout} + {GRACE_MARGIN_S}")
    strategy = one(objs, "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_runs_as_the_images_user_with_a_read_only_root_and_writable_scratch(target: str) -> None:
    objs = render(target)
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile, re.M).group(1))
    home = re.search(r"HOME=(\S+)", dockerfile).group(1)
    pod_sc = pod_spec(objs)["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == uid
    ctr = container(objs)
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in ctr["volumeMounts"]
                if "emptyDir" in volumes(objs)[m["name"]] and not m.get("readOnly")}
    # the CPU kernels' build cache and Hugging Face's cache live under ~/.cache; the compiler writes to /tmp
    assert {f"{home}/.cache", "/tmp", "/dev/shm"} <= writable
    models = mounts_by_volume(ctr)["models"]
    assert models["mountPath"] == "/models" and models["readOnly"] is True


@needs_kubectl
def test_gpu_overlay_asks_for_one_gpu_and_cpu_overlay_for_none(tmp_path: Path) -> None:
    gpu = container(render("overlays/gpu"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" == gpu["requests"]["nvidia.com/gpu"]
    cpu_objs = render("overlays/cpu")
    cpu = container(cpu_objs)["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu.get("requests", {})
    # the engine's torch threads leave the HTTP process one CPU of the limit (engine_cpus "auto")
    _, engine_cfg, server_cfg = effective_config(cpu_objs, tmp_path)
    assert engine_cfg.device == "cpu" and server_cfg.engine_cpus == "auto"
    assert engine_cfg.num_threads == int(cpu["limits"]["cpu"]) - 1
    # the GPU overlay reads its checkpoint from the models volume
    _, engine_cfg, _ = effective_config(render("overlays/gpu"), tmp_path)
    assert engine_cfg.device == "cuda" and engine_cfg.model.startswith("/models/")
    assert volumes(render("overlays/gpu"))["models"]["persistentVolumeClaim"]["claimName"] == \
        one(render("models"), "PersistentVolumeClaim")["metadata"]["name"]


# ----------------------------------------------------------------------------------------------------------------
# availability, autoscaling, routing
# ----------------------------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", SERVED)
def test_disruption_budget_and_autoscaler_target_the_deployment(target: str) -> None:
    objs = render(target)
    deployment = one(objs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    # a voluntary disruption leaves at least one replica serving
    assert hpa["minReplicas"] > pdb["maxUnavailable"]
    # the autoscaler owns the replica count
    assert "replicas" not in deployment["spec"]


@needs_kubectl
def test_autoscaling_metric_is_trimodes_queue_served_by_the_adapter_rule() -> None:
    hpa = one(render("overlays/gpu"), "HorizontalPodAutoscaler")["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {}
    for rule in rules:
        series = promql_parser.parse(rule["seriesQuery"])
        assert isinstance(series, promql_parser.VectorSelector)
        family = series.name
        assert re.search(rule["name"]["matches"], family)
        served[re.sub(rule["name"]["matches"], rule["name"]["as"], family)] = (family, rule)
    assert name in served, f"the HPA's metric {name} is served by no adapter rule ({sorted(served)})"
    family, rule = served[name]
    assert family == "trimode:num_requests_waiting" and exported_metrics()[family] == "gauge"
    # the series carry namespace and pod (added by the ServiceMonitor's scrape) and map to those resources
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = (rule["metricsQuery"].replace("<<.Series>>", family)
             .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
    assert promql_parser.parse(query).expr.name == family


@needs_kubectl
def test_inference_pool_selects_the_pods_and_its_picker_reads_trimodes_metrics() -> None:
    objs = render("overlays/gpu-inference-pool")
    pool = one(objs, "InferencePool")["spec"]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= pod_labels.items()
    ctr = container(objs)
    assert [p["number"] for p in pool["targetPorts"]] == [resolve_port(ctr, "http")]
    cm = one(objs, "ConfigMap", "trimode-epp-config")
    [text] = cm["data"].values()
    epp = yaml.safe_load(text)
    assert epp["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in epp["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    [engine] = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    assert pod_labels[extractor["engineLabelKey"]] == engine["name"]
    specs = {k: v for k, v in engine.items() if k.endswith("Spec") and v}
    assert specs == {"queuedRequestsSpec": "trimode:num_requests_waiting",
                     "runningRequestsSpec": "trimode:num_requests_running",
                     "kvUsageSpec": "trimode:kv_cache_usage_perc"}
    for family in specs.values():
        assert exported_metrics()[family] == "gauge", family
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics" and ("GET", "/metrics") in app_routes()
    # every plugin a profile or the data layer references is declared
    refs = [p["pluginRef"] for prof in epp["schedulingProfiles"] for p in prof["plugins"]]
    refs += [s["pluginRef"] for s in epp["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in epp["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(refs) <= set(plugins), set(refs) - set(plugins)
    # the component adds routing to the GPU overlay and changes nothing of it but the engine label
    routed = one(objs, "Deployment")
    del routed["spec"]["template"]["metadata"]["labels"][extractor["engineLabelKey"]]
    assert routed == one(render("overlays/gpu"), "Deployment")
    base = {(o["kind"], o["metadata"]["name"]) for o in render("overlays/gpu")}
    assert base <= {(o["kind"], o["metadata"]["name"]) for o in objs}

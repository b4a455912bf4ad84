"""Every pod the operator renders passes the Pod Security Standards `restricted` profile.

The profile is written out here, control by control, from the Kubernetes documentation
(concepts/security/pod-security-standards: the Baseline controls, which Restricted includes, then
the Restricted ones), each as a small checker that lists what a pod template breaks. Every rule
runs against every pod template (Ray head, each worker group, KubeRay's submitter) of every
example under examples/ and of a job using every securityContext override the spec allows; and
each rule has a pod that breaks it, so a checker that could not fail would fail its own test.

Also here: every example's RayJob asks for Ray's token authentication and passes KubeRay v1.7.0's
schema, and the spec refuses each override that would leave the profile, naming the field.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.rayjob import render_rayjob
from finetune_trainer.spec import SpecError, load_job, parse_job
from tests.tiny_models import minimal_manifest
from tests.unit.test_rayjob import kuberay_errors, kuberay_schema

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))
Template = dict[str, Any]
_kuberay = functools.cache(kuberay_schema)  # read and parse the CRD once

# --- the profile, from the documentation ------------------------------------------------------

BASELINE_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                                   "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                          "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                          "net.ipv4.tcp_keepalive_probes"})
RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"})


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("containers", "initContainers", "ephemeralContainers"):
        for i, container in enumerate(spec.get(kind) or []):
            yield f"{kind}[{i}]", container


def _contexts(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The pod's securityContext, then each container's."""
    yield "securityContext", spec.get("securityContext") or {}
    for where, container in _containers(spec):
        yield f"{where}.securityContext", container.get("securityContext") or {}


def host_process(t: Template) -> list[str]:
    return [f"{w}.windowsOptions.hostProcess" for w, sc in _contexts(t["spec"]) if (sc.get("windowsOptions") or {}).get("hostProcess")]


def host_namespaces(t: Template) -> list[str]:
    return [f"spec.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if t["spec"].get(key)]


def privileged_containers(t: Template) -> list[str]:
    return [f"{w}.securityContext.privileged" for w, c in _containers(t["spec"]) if (c.get("securityContext") or {}).get("privileged")]


def capabilities_baseline(t: Template) -> list[str]:
    return [f"{w} adds {cap}" for w, c in _containers(t["spec"])
            for cap in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [] if cap not in BASELINE_CAPABILITIES]


def host_path_volumes(t: Template) -> list[str]:
    return [f"volumes[{v.get('name')}].hostPath" for v in t["spec"].get("volumes") or [] if "hostPath" in v]


def host_ports(t: Template) -> list[str]:
    return [f"{w}.ports[{p.get('name')}].hostPort" for w, c in _containers(t["spec"]) for p in c.get("ports") or [] if p.get("hostPort")]


def apparmor(t: Template) -> list[str]:
    found = [f"{w}.appArmorProfile" for w, sc in _contexts(t["spec"])
             if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost")]
    prefix = "container.apparmor.security.beta.kubernetes.io/"
    found += [f"annotation {k}" for k, v in ((t.get("metadata") or {}).get("annotations") or {}).items()
              if k.startswith(prefix) and v != "runtime/default" and not v.startswith("localhost/")]
    return found


def selinux(t: Template) -> list[str]:
    found = []
    for where, sc in _contexts(t["spec"]):
        options = sc.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES or options.get("user") or options.get("role"):
            found.append(f"{where}.seLinuxOptions")
    return found


def proc_mount(t: Template) -> list[str]:
    return [f"{w}.securityContext.procMount" for w, c in _containers(t["spec"])
            if (c.get("securityContext") or {}).get("procMount", "Default") != "Default"]


def seccomp_baseline(t: Template) -> list[str]:
    return [f"{w}.seccompProfile" for w, sc in _contexts(t["spec"]) if (sc.get("seccompProfile") or {}).get("type") == "Unconfined"]


def sysctls(t: Template) -> list[str]:
    return [f"sysctl {s.get('name')}" for s in (t["spec"].get("securityContext") or {}).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]


def volume_types(t: Template) -> list[str]:
    found = []
    for volume in t["spec"].get("volumes") or []:
        sources = set(volume) - {"name"}
        if len(sources) != 1 or not sources <= RESTRICTED_VOLUMES:
            found.append(f"volumes[{volume.get('name')}]: {sorted(sources)}")
    return found


def privilege_escalation(t: Template) -> list[str]:
    # must be set to false, not merely left out
    return [f"{w}.securityContext.allowPrivilegeEscalation" for w, c in _containers(t["spec"])
            if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False]


def running_as_non_root(t: Template) -> list[str]:
    spec = t["spec"]
    pod = (spec.get("securityContext") or {}).get("runAsNonRoot")
    found = [f"{w}.securityContext.runAsNonRoot" for w, c in _containers(spec)
             if (c.get("securityContext") or {}).get("runAsNonRoot") is False
             or (pod is not True and (c.get("securityContext") or {}).get("runAsNonRoot") is not True)]
    if pod is False:
        found.append("securityContext.runAsNonRoot")
    return found


def running_as_non_root_user(t: Template) -> list[str]:
    return [f"{w}.runAsUser" for w, sc in _contexts(t["spec"]) if sc.get("runAsUser") == 0]


def seccomp_restricted(t: Template) -> list[str]:
    spec = t["spec"]
    allowed = ("RuntimeDefault", "Localhost")
    pod = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    found = []
    for where, container in _containers(spec):
        own = ((container.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if (own is not None and own not in allowed) or (own is None and pod not in allowed):
            found.append(f"{where}.seccompProfile")
    return found


def capabilities_restricted(t: Template) -> list[str]:
    found = []
    for where, container in _containers(t["spec"]):
        caps = (container.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where} does not drop ALL")
        found += [f"{where} adds {cap}" for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
    return found


RULES: dict[str, Callable[[Template], list[str]]] = {
    # Baseline
    "HostProcess": host_process, "Host Namespaces": host_namespaces, "Privileged Containers": privileged_containers,
    "Capabilities": capabilities_baseline, "HostPath Volumes": host_path_volumes, "Host Ports": host_ports,
    "AppArmor": apparmor, "SELinux": selinux, "/proc Mount Type": proc_mount, "Seccomp": seccomp_baseline, "Sysctls": sysctls,
    # Restricted
    "Volume Types": volume_types, "Privilege Escalation": privilege_escalation, "Running as Non-root": running_as_non_root,
    "Running as Non-root user": running_as_non_root_user, "Seccomp (restricted)": seccomp_restricted,
    "Capabilities (restricted)": capabilities_restricted,
}

# --- what is rendered ---------------------------------------------------------------------------

OVERRIDES = {"cluster": {
    "podSecurityContext": {"runAsUser": 2000, "runAsGroup": 2001, "fsGroup": 2002, "supplementalGroups": [2003], "runAsNonRoot": True,
                           "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/ray.json"}},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                 "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}},
}}


def _jobs() -> dict[str, Any]:
    jobs: dict[str, Any] = {p.relative_to(REPO / "examples").as_posix(): p for p in EXAMPLES}
    jobs["overrides (unit)"] = OVERRIDES
    return jobs


JOBS = _jobs()


def _load(name: str):
    source = JOBS[name]
    return load_job(source) if isinstance(source, Path) else parse_job(minimal_manifest(**source))


@functools.cache
def _rendered(name: str) -> dict[str, Any]:
    """The job's RayJob, rendered once per session (callers that change it take a copy)."""
    return render_rayjob(_load(name))


def pod_templates(rayjob: dict[str, Any]) -> dict[str, Template]:
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": spec["submitterPodTemplate"]}
    pods.update({f"worker group {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def _cases() -> list[Any]:
    cases = []
    for name in JOBS:
        for pod in pod_templates(_rendered(name)):
            cases += [pytest.param(name, pod, rule, id=f"{name}:{pod}:{rule}") for rule in RULES]
    return cases


@pytest.mark.parametrize(("job_name", "pod", "rule"), _cases())
def test_rendered_pod_passes_the_restricted_rule(job_name, pod, rule):
    template = pod_templates(_rendered(job_name))[pod]
    assert RULES[rule](template) == []


def test_every_example_is_covered():
    assert EXAMPLES, "no examples found"
    assert {"head", "submitter", "worker group workers"} <= set(pod_templates(render_rayjob(load_job(EXAMPLES[0]))))


# --- each rule can fail ----------------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[Template], None]:
    """A mutation: set `value` at a dotted path under the template (`[0]` indexes a list)."""
    def mutate(t: Template) -> None:
        node: Any = t
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key[1:-1])] if key.startswith("[") else node.setdefault(key, {})
        node[keys[-1]] = value
    return mutate


C0 = "spec.containers.[0].securityContext"
VIOLATIONS: dict[str, list[Callable[[Template], None]]] = {
    "HostProcess": [_set("spec.securityContext.windowsOptions", {"hostProcess": True})],
    "Host Namespaces": [_set("spec.hostNetwork", True), _set("spec.hostPID", True), _set("spec.hostIPC", True)],
    "Privileged Containers": [_set(f"{C0}.privileged", True)],
    "Capabilities": [_set(f"{C0}.capabilities.add", ["SYS_ADMIN"])],
    "HostPath Volumes": [_set("spec.volumes", [{"name": "node", "hostPath": {"path": "/"}}])],
    "Host Ports": [_set("spec.containers.[0].ports", [{"name": "dashboard", "containerPort": 8265, "hostPort": 8265}])],
    "AppArmor": [_set(f"{C0}.appArmorProfile", {"type": "Unconfined"}),
                 _set("metadata.annotations", {"container.apparmor.security.beta.kubernetes.io/ray-head": "unconfined"})],
    "SELinux": [_set("spec.securityContext.seLinuxOptions", {"type": "spc_t"}), _set(f"{C0}.seLinuxOptions", {"user": "system_u"})],
    "/proc Mount Type": [_set(f"{C0}.procMount", "Unmasked")],
    "Seccomp": [_set("spec.securityContext.seccompProfile", {"type": "Unconfined"})],
    "Sysctls": [_set("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "65536"}])],
    "Volume Types": [_set("spec.volumes", [{"name": "nfs", "nfs": {"server": "nfs.example", "path": "/"}}])],
    "Privilege Escalation": [_set(f"{C0}.allowPrivilegeEscalation", True), _set(C0, {"capabilities": {"drop": ["ALL"]}})],
    "Running as Non-root": [_set("spec.securityContext.runAsNonRoot", False), _set(f"{C0}.runAsNonRoot", False)],
    "Running as Non-root user": [_set("spec.securityContext.runAsUser", 0), _set(f"{C0}.runAsUser", 0)],
    "Seccomp (restricted)": [_set("spec.securityContext.seccompProfile", {"type": "Unconfined"}),
                             _set(f"{C0}.seccompProfile", {"type": "Unconfined"}),
                             lambda t: t["spec"]["securityContext"].pop("seccompProfile")],
    "Capabilities (restricted)": [_set(f"{C0}.capabilities", {"drop": ["NET_RAW"]}),
                                  _set(f"{C0}.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]})],
}


def test_every_rule_has_violations():
    assert set(VIOLATIONS) == set(RULES)


@pytest.mark.parametrize(("rule", "index"), [(r, i) for r, ms in VIOLATIONS.items() for i in range(len(ms))])
def test_a_pod_breaking_the_rule_is_caught(rule, index):
    for template in pod_templates(_rendered(next(iter(JOBS)))).values():
        assert RULES[rule](template) == []
        broken = copy.deepcopy(template)
        VIOLATIONS[rule][index](broken)
        assert RULES[rule](broken), f"{rule} passed a pod that breaks it"


def test_an_init_container_is_judged_too():
    """KubeRay adds wait-gcs-ready to worker pods with the Ray container's securityContext; one
    without it would fail the profile."""
    template = copy.deepcopy(pod_templates(_rendered(next(iter(JOBS))))["worker group workers"])
    ray = template["spec"]["containers"][0]
    template["spec"]["initContainers"] = [{"name": "wait-gcs-ready", "image": ray["image"], "securityContext": ray["securityContext"]}]
    assert all(rule(template) == [] for rule in RULES.values())
    template["spec"]["initContainers"][0].pop("securityContext")
    assert privilege_escalation(template) and capabilities_restricted(template)


# --- every example: token auth, KubeRay's schema --------------------------------------------------

@pytest.mark.parametrize("job_name", list(JOBS))
def test_every_rayjob_asks_for_token_auth_and_passes_kuberays_schema(job_name):
    rayjob = render_rayjob(_load(job_name), owner_uid="uid-1", generation=1)
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert kuberay_errors(_kuberay(), rayjob) == []


# --- what a hostile job author cannot write -----------------------------------------------------

@pytest.mark.parametrize(
    ("cluster", "path", "words"),
    [
        ({"podSecurityContext": {"runAsUser": 0}}, "spec.cluster.podSecurityContext.runAsUser", ["root", "restricted"]),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "spec.cluster.podSecurityContext.runAsNonRoot", ["root", "restricted"]),
        ({"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}}, "spec.cluster.podSecurityContext.seccompProfile.type",
         ["seccomp", "RuntimeDefault"]),
        ({"podSecurityContext": {"seccompProfile": {"type": "Localhost"}}}, "spec.cluster.podSecurityContext.seccompProfile",
         ["localhostProfile"]),
        ({"podSecurityContext": {"fsGroup": -1}}, "spec.cluster.podSecurityContext.fsGroup", ["greater than or equal to 0"]),
        ({"podSecurityContext": {"supplementalGroups": [-5]}}, "spec.cluster.podSecurityContext.supplementalGroups[0]", ["0"]),
        ({"containerSecurityContext": {"privileged": True}}, "spec.cluster.containerSecurityContext.privileged", ["root", "restricted"]),
        ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "spec.cluster.containerSecurityContext.allowPrivilegeEscalation",
         ["restricted"]),
        ({"containerSecurityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"]}}},
         "spec.cluster.containerSecurityContext.capabilities.add", ["SYS_ADMIN", "NET_BIND_SERVICE"]),
        ({"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "spec.cluster.containerSecurityContext.capabilities.drop",
         ["ALL"]),
        # not fields at all: a manifest naming them is refused, never passed on
        ({"hostNetwork": True}, "spec.cluster.hostNetwork", ["unknown field"]),
        ({"podSecurityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}, "spec.cluster.podSecurityContext.sysctls",
         ["unknown field"]),
        ({"podSecurityContext": {"seLinuxOptions": {"type": "spc_t"}}}, "spec.cluster.podSecurityContext.seLinuxOptions", ["unknown field"]),
        ({"containerSecurityContext": {"procMount": "Unmasked"}}, "spec.cluster.containerSecurityContext.procMount", ["unknown field"]),
        ({"head": {"hostPath": "/"}}, "spec.cluster.head.hostPath", ["unknown field"]),
        ({"auth": "none"}, "spec.cluster.auth", ["token", "disabled"]),
        ({"rayVersion": "2.51.0"}, "spec.cluster.auth", ["2.52.0", "disabled"]),
        ({"workers": {"ephemeralStorage": "100Mi"}}, "spec.cluster.workers.ephemeralStorage", ["1Gi"]),
        ({"head": {"ephemeralStorage": "lots"}}, "spec.cluster.head.ephemeralStorage", ["quantity"]),
    ],
)
def test_an_override_that_leaves_the_profile_is_refused_naming_the_field(cluster, path, words):
    with pytest.raises(SpecError) as err:
        parse_job(minimal_manifest(cluster=cluster))
    found = {p: m for p, m in err.value.problems}
    assert set(found) == {path}, err.value.problems
    assert all(w in found[path] for w in words), found[path]


def test_an_old_ray_may_run_without_auth_if_the_manifest_says_so():
    rayjob = render_rayjob(parse_job(minimal_manifest(cluster={"rayVersion": "2.51.0", "auth": "disabled"})))
    assert "authOptions" not in rayjob["spec"]["rayClusterSpec"]

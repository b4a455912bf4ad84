"""The job's NetworkPolicy (networkpolicy.py): the whole rendered object, its fields checked against
the `kubernetes` client's networking.k8s.io/v1 models, the pods it selects being the RayJob's, what
a job's author can and cannot open with spec.cluster.network and the Ingress's controllerNamespace,
and `finetune render` printing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.networkpolicy import network_policy_name, render_network_policy
from finetune_operator.rayjob import labels, rayjob_name, render_rayjob
from finetune_trainer.spec import SpecError, load_job, parse_job
from tests.tiny_models import minimal_manifest
from tests.unit.test_ingress import LABELS, api_problems

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))
OWNER = [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "unit", "uid": "uid-1",
          "controller": True, "blockOwnerDeletion": True}]
OWN_PODS = {"podSelector": {"matchLabels": {"finetune.dev/job": "unit"}}}
DASHBOARD = [{"protocol": "TCP", "port": 8265}]
INGRESS = {"host": "ray-unit.example.com", "tlsSecretName": "ray-unit-tls", "controllerNamespace": "ingress-nginx"}


def job(name: str = "unit", **cluster: Any):
    return parse_job({**minimal_manifest(cluster=cluster), "metadata": {"name": name, "namespace": "ml"}})


def from_namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def test_the_default_policy_admits_the_job_the_submitter_and_kuberay_and_leaves_egress_open():
    assert render_network_policy(job(), owner_uid="uid-1", kuberay_namespace="kuberay-system") == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "unit-ray-netpol", "namespace": "ml", "labels": LABELS, "ownerReferences": OWNER},
        "spec": {
            "podSelector": OWN_PODS["podSelector"],
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [OWN_PODS]},  # every port: Ray's nodes pick most of theirs at run time
                {"from": [{"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": "unit-ray"}}}], "ports": DASHBOARD},
                {"from": [from_namespace("kuberay-system")], "ports": DASHBOARD},
            ],
        },
    }


def test_the_whole_policy_with_an_ingress_and_restricted_egress():
    restricted = job(dashboard={"ingress": INGRESS}, network={"egress": [
        {"cidr": "10.96.0.1/32", "ports": [443]},
        {"cidr": "2001:db8::/64", "ports": [8333, 8334], "protocol": "UDP"},
        {"cidr": "192.168.0.0/16"},
    ]})
    rendered = render_network_policy(restricted, kuberay_namespace="ray", ingress_controller_namespace="not-this-one")
    assert "ownerReferences" not in rendered["metadata"]
    assert rendered["spec"] == {
        "podSelector": OWN_PODS["podSelector"],
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {"from": [OWN_PODS]},
            {"from": [{"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": "unit-ray"}}}], "ports": DASHBOARD},
            {"from": [from_namespace("ray")], "ports": DASHBOARD},
            {"from": [from_namespace("ingress-nginx")], "ports": DASHBOARD},  # the spec's namespace wins
        ],
        "egress": [
            {"to": [OWN_PODS]},
            {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 443}]},
            {"to": [{"ipBlock": {"cidr": "2001:db8::/64"}}],
             "ports": [{"protocol": "UDP", "port": 8333}, {"protocol": "UDP", "port": 8334}]},
            {"to": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]},
        ],
    }


@pytest.mark.parametrize(("ingress", "default", "admitted"), [
    (None, "ingress-nginx", None),  # no Ingress: the controller has no business with the dashboard
    ({"host": "ray.example.com", "tlsSecretName": "tls"}, "ingress-nginx", "ingress-nginx"),  # the operator's default
    ({"host": "ray.example.com", "tlsSecretName": "tls", "controllerNamespace": "traefik"}, "ingress-nginx", "traefik"),
    ({"host": "ray.example.com", "tlsSecretName": "tls"}, None, None),  # nobody said where: nobody (the operator warns)
])
def test_the_ingress_controllers_namespace(ingress, default, admitted):
    cluster = {"dashboard": {"ingress": ingress}} if ingress else {}
    rules = render_network_policy(job(**cluster), ingress_controller_namespace=default)["spec"]["ingress"]
    namespaces = [r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for r in rules if "namespaceSelector" in r["from"][0]]
    assert namespaces == ["kuberay-system", *([admitted] if admitted else [])]


def test_prometheus_is_admitted_to_the_metrics_port_only_when_named():
    rules = render_network_policy(job(), prometheus_namespace="monitoring")["spec"]["ingress"]
    assert rules[-1] == {"from": [from_namespace("monitoring")], "ports": [{"protocol": "TCP", "port": 8080}]}
    assert not any(r["from"] == [from_namespace("monitoring")] for r in render_network_policy(job())["spec"]["ingress"])


@pytest.mark.parametrize("cluster", [{}, {"dashboard": {"ingress": INGRESS}},
                                     {"network": {"egress": [{"cidr": "10.0.0.0/8", "ports": [443]}, {"cidr": "::/0"}]}}],
                         ids=["default", "ingress", "egress"])
def test_every_field_is_the_real_network_policy_apis(cluster):
    assert api_problems(render_network_policy(job(**cluster), owner_uid="uid"), "V1NetworkPolicy") == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_a_policy_around_its_rayjobs_pods(path):
    example = load_job(path)
    policy = render_network_policy(example, owner_uid="uid")
    rayjob = render_rayjob(example, owner_uid="uid")
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in templates:  # the head and every worker group are inside the policy
        assert selector.items() <= template["metadata"]["labels"].items()
    submitter_labels = rayjob["spec"].get("submitterPodTemplate", {}).get("metadata", {}).get("labels", {})
    if submitter_labels:  # ours carries the job's labels: the submitter is one of the job's own pods
        assert selector.items() <= submitter_labels.items()
    assert policy["metadata"]["name"] == network_policy_name(example.name) == f"{rayjob['metadata']['name']}-netpol"
    assert policy["metadata"]["ownerReferences"] == rayjob["metadata"]["ownerReferences"]
    submitter = policy["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"]
    assert submitter == {"batch.kubernetes.io/job-name": rayjob["metadata"]["name"]}  # KubeRay's Job is named so
    assert api_problems(policy, "V1NetworkPolicy") == []


def test_another_jobs_pods_are_not_its_own():
    mine, theirs = render_network_policy(job("unit")), render_network_policy(job("other"))
    assert mine["spec"]["ingress"][0]["from"] != theirs["spec"]["ingress"][0]["from"]
    assert theirs["spec"]["podSelector"] == {"matchLabels": {"finetune.dev/job": "other"}} != mine["spec"]["podSelector"]
    assert labels(job("other"))["finetune.dev/job"] == "other"


HOSTILE = {
    # what an author can write: the widest egress, a namespace of their choosing for the controller
    "egress-to-everywhere": {"network": {"egress": [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]}},
    "egress-to-cloud-metadata": {"network": {"egress": [{"cidr": "169.254.169.254/32", "ports": [80]}]}},
    "controller-namespace-of-their-own": {"dashboard": {"ingress": {**INGRESS, "controllerNamespace": "kube-system"}}},
}


@pytest.mark.parametrize("cluster", HOSTILE.values(), ids=HOSTILE)
def test_no_spec_field_opens_the_ray_ports_to_anyone_else(cluster):
    """Whatever the spec says, only the job's own pods reach Ray's ports other than 8265; other
    namespaces come in only by the label the API server sets, only to 8265; no address block is
    ever admitted (an ipBlock ingress would let in the Internet through a LoadBalancer)."""
    rules = render_network_policy(job(**cluster), ingress_controller_namespace="ingress-nginx")["spec"]["ingress"]
    assert rules[0] == {"from": [OWN_PODS]}
    for rule in rules[1:]:
        assert rule["ports"] == DASHBOARD and len(rule["from"]) == 1
        [peer] = rule["from"]
        assert "ipBlock" not in peer
        if "namespaceSelector" in peer:  # another namespace: named by metadata.name, all its pods, 8265 only
            assert set(peer) == {"namespaceSelector"}
            assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
        else:  # this namespace: KubeRay's submitter of this job's RayJob
            assert peer == {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": "unit-ray"}}}
    # egress as written, which is never more than the default (open) allows
    plain = render_network_policy(job(), ingress_controller_namespace="ingress-nginx")
    assert rules[:3] == plain["spec"]["ingress"]


def test_the_widest_egress_is_rendered_as_written():
    rendered = render_network_policy(job(**HOSTILE["egress-to-everywhere"]))
    blocks = [r["to"][0]["ipBlock"]["cidr"] for r in rendered["spec"]["egress"] if "ipBlock" in r.get("to", [{}])[0]]
    assert blocks == ["0.0.0.0/0", "::/0"]


@pytest.mark.parametrize(("network", "path", "words"), [
    ({"egress": [{"cidr": "10.0.0.1/8"}]}, "spec.cluster.network.egress[0].cidr", "host bits set: the block is 10.0.0.0/8"),
    ({"egress": [{"cidr": "10.0.0.7"}]}, "spec.cluster.network.egress[0].cidr", "no prefix length: write 10.0.0.7/32"),
    ({"egress": [{"cidr": "s3.example.com/32"}]}, "spec.cluster.network.egress[0].cidr", "not an address block"),
    ({"egress": [{"cidr": "10.0.0.0/33"}]}, "spec.cluster.network.egress[0].cidr", "not an address block"),
    ({"egress": [{"cidr": "2001:db8::1/64"}]}, "spec.cluster.network.egress[0].cidr", "host bits set: the block is 2001:db8::/64"),
    ({"egress": [{"cidr": "10.0.0.0/8", "ports": [0]}]}, "spec.cluster.network.egress[0].ports[0]", "greater than or equal to 1"),
    ({"egress": [{"cidr": "10.0.0.0/8", "ports": [65536]}]}, "spec.cluster.network.egress[0].ports[0]", "less than or equal to 65535"),
    ({"egress": [{"cidr": "10.0.0.0/8", "protocol": "SCTP"}]}, "spec.cluster.network.egress[0].protocol", "'TCP' or 'UDP'"),
    ({"egress": [{"cidr": f"10.{i}.0.0/16"} for i in range(33)]}, "spec.cluster.network.egress", "at most 32"),
    ({"ingress": [{"cidr": "0.0.0.0/0"}]}, "spec.cluster.network.ingress", "unknown field"),  # no such thing to widen
    ({"egress": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}, "spec.cluster.network.egress[0].except", "unknown field"),
])
def test_a_bad_network_section_is_a_spec_problem_at_its_field(network, path, words):
    with pytest.raises(SpecError) as info:
        job(network=network)
    [(where, message)] = info.value.problems
    assert where == path and words in message, (where, message)


def test_egress_absent_and_empty_differ():
    assert "Egress" not in render_network_policy(job())["spec"]["policyTypes"]
    closed = render_network_policy(job(network={"egress": []}))["spec"]
    assert closed["policyTypes"] == ["Ingress", "Egress"] and len(closed["egress"]) == 2  # own pods and DNS only


@pytest.mark.parametrize(("namespace", "words"), [
    ("Ingress_NGINX", "not a namespace name"),
    ("a" * 64, "at most 63 characters"),
])
def test_a_bad_controller_namespace_is_refused_at_its_field(namespace, words):
    with pytest.raises(SpecError) as info:
        job(dashboard={"ingress": {**INGRESS, "controllerNamespace": namespace}})
    [(where, message)] = info.value.problems
    assert where == "spec.cluster.dashboard.ingress.controllerNamespace" and words in message


def test_render_prints_the_policy_as_the_last_document(tmp_path, capsys):
    manifest = tmp_path / "job.yaml"
    doc = {**minimal_manifest(cluster={"dashboard": {"ingress": {"host": "ray.example.com", "tlsSecretName": "tls"}}}),
           "metadata": {"name": "unit", "namespace": "ml"}}
    manifest.write_text(yaml.safe_dump(doc))
    assert main(["render", str(manifest), "--owner-uid", "uid-1", "--kuberay-namespace", "ray",
                 "--ingress-controller-namespace", "traefik"]) == 0
    kinds = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in kinds] == ["RayJob", "Ingress", "NetworkPolicy", *["ServiceAccount", "ConfigMap", "Role", "RoleBinding"]]
    assert kinds[2] == render_network_policy(parse_job(doc), owner_uid="uid-1", kuberay_namespace="ray",
                                              ingress_controller_namespace="traefik")
    manifest.write_text(yaml.safe_dump({**doc, "spec": minimal_manifest()["spec"]}))
    assert main(["render", str(manifest)]) == 0
    plain = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in plain] == ["RayJob", "NetworkPolicy", *["ServiceAccount", "ConfigMap", "Role", "RoleBinding"]]
    assert plain[1]["spec"]["ingress"][2]["from"] == [from_namespace("kuberay-system")]
    assert plain[1]["metadata"]["name"] == f"{rayjob_name('unit')}-netpol"

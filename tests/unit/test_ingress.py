"""The dashboard Ingress (spec.cluster.dashboard.ingress): the whole rendered object, its names
taken from the RayJob's, the URL status.dashboardURL shows, the spec's rules, and every field
checked against the `kubernetes` client's networking.k8s.io/v1 models (generated from the API's
OpenAPI document), so a misspelt field cannot pass."""

from __future__ import annotations

import re
from typing import Any

import kubernetes
import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.ingress import dashboard_url, ingress_name, render_dashboard_ingress
from finetune_operator.rayjob import head_service_name, labels, rayjob_name
from finetune_trainer.spec import SpecError, parse_job
from tests.tiny_models import minimal_manifest

INGRESS = {"host": "ray-unit.example.com", "className": "nginx", "path": "/",
           "annotations": {"nginx.ingress.kubernetes.io/auth-url": "https://auth.example.com/oauth2/auth"},
           "tlsSecretName": "ray-unit-tls"}
LABELS = {"app.kubernetes.io/name": "finetune-trainer", "app.kubernetes.io/instance": "unit",
          "app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/job": "unit"}


def job(ingress: dict[str, Any] | None = None, name: str = "unit", namespace: str = "ml"):
    cluster = {"dashboard": {"ingress": ingress}} if ingress is not None else {}
    return parse_job({**minimal_manifest(cluster=cluster), "metadata": {"name": name, "namespace": namespace}})


def api_problems(obj: dict[str, Any], model: str) -> list[str]:
    """Fields the real API type does not have, and required ones it lacks (the client's models)."""
    found = unknown_fields(obj, model, "")
    try:  # the models' constructors check required fields
        kubernetes.client.ApiClient()._ApiClient__deserialize(obj, model)
    except ValueError as err:
        found.append(f"required: {err}")
    return found


def unknown_fields(obj: Any, model: str, where: str) -> list[str]:
    if model.lower().startswith("list["):
        return [p for i, item in enumerate(obj) for p in unknown_fields(item, model[5:-1], f"{where}[{i}]")]
    if model.lower().startswith(("dict(", "dict[")):
        return [] if isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values()) else [f"{where}: not a map of strings"]
    if model == "object":  # IntOrString (a NetworkPolicy's port)
        return [] if type(obj) in (int, str) else [f"{where}: {obj!r} is neither int nor str"]
    if model in {"str", "int", "bool"}:
        return [] if type(obj).__name__ == model else [f"{where}: {obj!r} is not {model}"]
    cls = getattr(kubernetes.client, model)
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    found = [f"{where}.{key}: no such field in {model}" for key in obj if key not in by_json]
    for key, value in obj.items():
        if key in by_json:
            found += unknown_fields(value, cls.openapi_types[by_json[key]], f"{where}.{key}")
    return found


def test_without_ingress_nothing_is_rendered_and_the_url_is_the_services():
    plain = job()
    assert render_dashboard_ingress(plain, owner_uid="uid") is None
    assert dashboard_url(plain) == f"http://{head_service_name('unit')}.ml.svc:8265" == "http://unit-ray-head-svc.ml.svc:8265"


def test_the_whole_ingress():
    rendered = render_dashboard_ingress(job(INGRESS), owner_uid="uid-1")
    assert rendered == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "unit-ray-dashboard", "namespace": "ml", "labels": LABELS,
            "annotations": {"nginx.ingress.kubernetes.io/auth-url": "https://auth.example.com/oauth2/auth"},
            "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "unit",
                                 "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "ingressClassName": "nginx",
            "rules": [{"host": "ray-unit.example.com", "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "unit-ray-head-svc", "port": {"number": 8265}}},
            }]}}],
            "tls": [{"hosts": ["ray-unit.example.com"], "secretName": "ray-unit-tls"}],
        },
    }
    assert rendered["metadata"]["labels"] == labels(job(INGRESS))  # the RayJob's labels
    assert dashboard_url(job(INGRESS)) == "https://ray-unit.example.com/"


MINIMAL = {"host": "ray.example.com", "tlsSecretName": "ray-tls"}


def test_the_minimal_ingress_takes_defaults():
    rendered = render_dashboard_ingress(job({**MINIMAL, "path": "/ray/unit"}))
    assert "ownerReferences" not in rendered["metadata"] and "annotations" not in rendered["metadata"]
    assert rendered["spec"] == {"rules": [{"host": "ray.example.com", "http": {"paths": [{
        "path": "/ray/unit", "pathType": "Prefix",
        "backend": {"service": {"name": "unit-ray-head-svc", "port": {"number": 8265}}}}]}}],
        "tls": [{"hosts": ["ray.example.com"], "secretName": "ray-tls"}]}
    assert dashboard_url(job({**MINIMAL, "path": "/ray/unit"})) == "https://ray.example.com/ray/unit"
    assert job(MINIMAL).spec.cluster.dashboard.ingress.path == "/"


@pytest.mark.parametrize("ingress", [{"host": "ray.example.com"}, {"host": "ray.example.com", "tlsSecretName": None}],
                         ids=["absent", "null"])
def test_an_ingress_without_tls_is_refused_with_the_fix(ingress):
    """Plain HTTP would carry the dashboard (which runs code on the cluster) and its token readable."""
    with pytest.raises(SpecError) as info:
        job(ingress)
    [(path, message)] = info.value.problems
    assert path == "spec.cluster.dashboard.ingress.tlsSecretName"
    assert "TLS only" in message and "kubectl create secret tls" in message and "cert-manager" in message


def test_the_crd_requires_tls_too():
    """So `kubectl apply` refuses it before the operator sees it."""
    from finetune_operator.crd import build_crd

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    ingress = spec["properties"]["cluster"]["properties"]["dashboard"]["properties"]["ingress"]
    assert set(ingress["required"]) == {"host", "tlsSecretName"}
    assert "nullable" not in ingress["properties"]["tlsSecretName"]


@pytest.mark.parametrize("ingress", [INGRESS, MINIMAL], ids=["every-option", "minimal"])
def test_every_field_is_the_real_ingress_apis(ingress):
    assert api_problems(render_dashboard_ingress(job(ingress), owner_uid="uid"), "V1Ingress") == []


def test_the_api_check_catches_a_misspelt_field():
    rendered = render_dashboard_ingress(job(INGRESS))
    rendered["spec"]["ingressClass"] = rendered["spec"].pop("ingressClassName")
    del rendered["spec"]["rules"][0]["http"]["paths"][0]["pathType"]
    problems = api_problems(rendered, "V1Ingress")
    assert len(problems) == 2 and problems[0].startswith(".spec.ingressClass: no such field")
    assert problems[1].startswith("required:") and "pathType" in problems[1], problems


@pytest.mark.parametrize("name", ["unit", "9lives", "a" * 63])
def test_the_name_follows_the_rayjobs(name):
    assert ingress_name(name) == f"{rayjob_name(name)}-dashboard"
    rendered = render_dashboard_ingress(job({**MINIMAL, "host": "x.example.com"}, name=name))
    assert rendered["metadata"]["name"] == ingress_name(name)
    assert rendered["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == head_service_name(name)
    assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", ingress_name(name)) and len(ingress_name(name)) <= 253


@pytest.mark.parametrize(("ingress", "path"), [
    ({}, "spec.cluster.dashboard.ingress.host"),
    ({"host": "Ray.Example.com"}, "spec.cluster.dashboard.ingress.host"),
    ({"host": "*.example.com"}, "spec.cluster.dashboard.ingress.host"),
    ({"host": "10.0.0.1"}, "spec.cluster.dashboard.ingress.host"),
    ({"host": "ray.example.com", "path": "ray"}, "spec.cluster.dashboard.ingress.path"),
    ({"host": "ray.example.com", "tls": "x"}, "spec.cluster.dashboard.ingress.tls"),
    ({"host": "ray.example.com", "tlsSecretName": ""}, "spec.cluster.dashboard.ingress.tlsSecretName"),
])
def test_a_bad_ingress_is_a_spec_problem_at_its_field(ingress, path):
    with pytest.raises(SpecError) as info:
        job({"tlsSecretName": "ray-tls", **ingress})
    assert [p for p, _ in info.value.problems] == [path]


def test_render_prints_the_ingress_as_a_second_document(tmp_path, capsys):
    manifest = tmp_path / "job.yaml"
    doc = {**minimal_manifest(cluster={"dashboard": {"ingress": INGRESS}}), "metadata": {"name": "unit", "namespace": "ml"}}
    manifest.write_text(yaml.safe_dump(doc))
    assert main(["render", str(manifest), "--owner-uid", "uid-1"]) == 0
    rayjob, ingress, policy, *_ = yaml.safe_load_all(capsys.readouterr().out)
    assert rayjob["kind"] == "RayJob" and ingress == render_dashboard_ingress(job(INGRESS), owner_uid="uid-1")
    assert policy["kind"] == "NetworkPolicy"
    manifest.write_text(yaml.safe_dump({**doc, "spec": minimal_manifest()["spec"]}))
    assert main(["render", str(manifest)]) == 0
    assert [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)] == ["RayJob", "NetworkPolicy", *["ServiceAccount", "ConfigMap", "Role", "RoleBinding"]]

"""The job's NetworkPolicy end to end: the real `finetune operator` (kopf) process and the real
kubectl against the API emulator. The emulator enforces no traffic (no CNI); what is checked here is
the operator's part: the policy exists before the RayJob, is owned by the job, selects the RayJob's
pods, and goes with the job."""

from __future__ import annotations

from tests.e2e.operator_harness import WAIT, Kubectl, OperatorProcess, apply, get, job, manifest, rayjobs, wait_for


def test_the_network_policy_exists_before_the_rayjob_owned_by_the_job(kubectl: Kubectl, namespace: str,
                                                                        operator: OperatorProcess) -> None:
    ingress = {"host": "ray-quickstart.example.com", "tlsSecretName": "ray-tls", "controllerNamespace": "ingress-nginx"}
    apply(kubectl, namespace, manifest(cluster={"dashboard": {"ingress": ingress}}))
    ftj = job(kubectl, namespace, "quickstart")
    [rayjob] = wait_for(lambda: rayjobs(kubectl, namespace), timeout=WAIT, what="the RayJob")
    policy = get(kubectl, namespace, "networkpolicy", "quickstart-ray-netpol")
    meta, spec = policy["metadata"], policy["spec"]
    assert meta["ownerReferences"] == [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "quickstart",
                                        "uid": ftj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    # one resourceVersion counter for every object: the policy was written before the RayJob was
    assert int(meta["resourceVersion"]) < int(rayjob["metadata"]["resourceVersion"])
    # it selects the pods KubeRay starts from the RayJob's head and worker templates
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert spec["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]  # egress left open: the example restricts none
    admitted = [r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                for r in spec["ingress"] if "namespaceSelector" in r["from"][0]]
    assert admitted == ["kuberay-system", "ingress-nginx"]  # the operator's default, the spec's controller
    assert {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": "quickstart-ray"}}} in [
        r["from"][0] for r in spec["ingress"]]  # KubeRay's submitter Job is named after the RayJob

    kubectl("delete", "ftj", "quickstart", "-n", namespace, "--timeout=20s")
    wait_for(lambda: get(kubectl, namespace, "networkpolicies")["items"] == [] and rayjobs(kubectl, namespace) == [],
             timeout=WAIT, what="the NetworkPolicy and the RayJob to be garbage-collected")

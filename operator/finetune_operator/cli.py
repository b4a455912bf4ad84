"""`finetune`: the one command. `crd` and `render` show what the operator would apply, `operator`
runs it; every other subcommand (validate, run) is the trainer's CLI, so the command works the
same with or without the operator installed.

Bad input is one message and exit status 2, in the trainer CLI's format, never a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from finetune_trainer import cli as trainer_cli
from finetune_trainer.spec import SpecError, load_job
from finetune_trainer.spec.queueing import queue_labels

from .crd import build_crd
from .ingress import render_dashboard_ingress
from .networkpolicy import DEFAULT_KUBERAY_NAMESPACE, render_network_policy
from .rayjob import render_rayjob
from .trainer_access import render_trainer_access

OWN_COMMANDS = ("crd", "render", "operator")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] not in OWN_COMMANDS:
        if not args or args[0] in ("-h", "--help"):
            _parser().print_help()
            print("\nvalidate, run: see `finetune validate -h`, `finetune run -h`")
            return 0 if args else trainer_cli.EXIT_INVALID
        return trainer_cli.main(args)
    parsed = _parser().parse_args(args)
    if parsed.command == "crd":
        _print_yaml(build_crd())
        return 0
    if parsed.command == "operator":
        return _operator(parsed)
    try:
        job = load_job(parsed.manifest, parsed.overrides, for_cluster=True)
    except SpecError as err:
        print(f"finetune: {parsed.manifest} is invalid\n{err.render()}", file=sys.stderr)
        return trainer_cli.EXIT_INVALID
    except FileNotFoundError as err:
        print(f"finetune: {err}", file=sys.stderr)
        return trainer_cli.EXIT_INVALID
    _print_yaml(render_rayjob(job, owner_uid=parsed.owner_uid, queue=queue_labels(job.metadata.labels)))  # as the operator renders it
    ingress = render_dashboard_ingress(job, owner_uid=parsed.owner_uid)
    if ingress is not None:  # spec.cluster.dashboard.ingress: a second document, as the operator creates it too
        sys.stdout.write("---\n")
        _print_yaml(ingress)
    sys.stdout.write("---\n")  # the NetworkPolicy the operator creates first (unless --no-network-policies)
    _print_yaml(render_network_policy(job, owner_uid=parsed.owner_uid, kuberay_namespace=parsed.kuberay_namespace,
                                      ingress_controller_namespace=parsed.ingress_controller_namespace,
                                      prometheus_namespace=parsed.prometheus_namespace))
    for obj in render_trainer_access(job, owner_uid=parsed.owner_uid):  # what the driver reports progress through
        sys.stdout.write("---\n")
        _print_yaml(obj)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Validate, run and render FineTuneJob manifests.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition (YAML)")
    render = sub.add_parser(
        "render", help="print what the operator creates for a manifest (YAML): the KubeRay RayJob, the dashboard Ingress (if any), the NetworkPolicy, and the ServiceAccount, ConfigMap, Role and RoleBinding the driver reports progress through")
    render.add_argument("manifest", help="FineTuneJob YAML")
    render.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a spec field, e.g. --set cluster.workers.replicas=4 (repeatable)")
    render.add_argument("--owner-uid", metavar="UID", help="add an ownerReference to the FineTuneJob with this uid")
    _network_policy_flags(render)
    op = sub.add_parser("operator", help="run the operator (kopf, standalone) against the current Kubernetes context")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", dest="namespaces", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (the default)")
    op.add_argument("--health-port", type=int, default=8080, help="liveness endpoint port (/healthz)")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    op.add_argument("--log-format", choices=("plain", "json"), default="plain")
    op.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                    help="how often a running job's progress ConfigMap is read")
    op.add_argument("--no-network-policies", dest="network_policies", action="store_false",
                    help="create no NetworkPolicy per job (a cluster whose CNI enforces none)")
    _network_policy_flags(op)
    op.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub.add_parser("validate", help="check a manifest: fields, then data and model fit")
    sub.add_parser("run", help="run a manifest on local Ray (or the cluster in RAY_ADDRESS)")
    return parser


def _network_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kuberay-namespace", default=DEFAULT_KUBERAY_NAMESPACE, metavar="NS",
                        help="namespace of KubeRay's operator, admitted to each job's dashboard port (it polls it)")
    parser.add_argument("--ingress-controller-namespace", metavar="NS",
                        help="namespace of the Ingress controller, admitted to the dashboard of jobs with an Ingress "
                             "that name none (spec.cluster.dashboard.ingress.controllerNamespace)")
    parser.add_argument("--prometheus-namespace", metavar="NS",
                        help="namespace of Prometheus, admitted to Ray's metrics port (8080) of every job's pods "
                             "(the training metrics; default: none)")


def _operator(parsed: argparse.Namespace) -> int:
    try:  # the operator's dependencies are the `operator` extra, not the core
        from .handlers import OperatorConfig
        from .serve import run
    except ImportError as err:
        print(f"finetune: the operator needs the operator extra: pip install 'finetune-operator[operator]' ({err})",
              file=sys.stderr)
        return trainer_cli.EXIT_INVALID
    config = OperatorConfig(progress_interval=parsed.progress_interval,
                            network_policies=parsed.network_policies, kuberay_namespace=parsed.kuberay_namespace,
                            ingress_controller_namespace=parsed.ingress_controller_namespace,
                            prometheus_namespace=parsed.prometheus_namespace)
    run(namespaces=parsed.namespaces, health_port=parsed.health_port, metrics_port=parsed.metrics_port or None,
        log_format=parsed.log_format, verbose=parsed.verbose, config=config)
    return 0


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the RayJob's runtimeEnvYAML) as `|` blocks, readable and diffable; a
    value used twice (the NetworkPolicy's own-pods selector) written out twice, not as `*id001`."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def _print_yaml(document: dict[str, Any]) -> None:
    sys.stdout.write(yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120))


if __name__ == "__main__":
    sys.exit(main())

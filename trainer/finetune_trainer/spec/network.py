"""Where a job's Ray pods may connect to (`spec.cluster.network`); the operator renders it, with
who may connect to them, into the job's NetworkPolicy (finetune_operator/networkpolicy.py).

Incoming connections are not the author's to widen: the policy admits the job's own pods, KubeRay
and (with a dashboard Ingress) the Ingress controller's namespace, and no field adds anyone else.
Outgoing connections are open by default (S3, model hubs, pip); `egress` narrows them to the
destinations listed, plus DNS and the job's own pods. A rule that lists 0.0.0.0/0 is allowed: it
opens no more than the default does, and restricting egress protects the job's own data, nobody
else's.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, field_validator

from .base import SpecModel

Port = Annotated[int, Field(ge=1, le=65535)]
MAX_EGRESS_RULES = 32  # a policy stays readable and well inside the API server's object size
MAX_PORTS = 32


class EgressRule(SpecModel):
    """One destination the Ray pods may connect to."""

    cidr: str = Field(
        min_length=1, max_length=43,
        description="Destination address block, IPv4 or IPv6 (10.20.0.0/16, 203.0.113.7/32, 2001:db8::/64), "
                    "e.g. the S3 endpoint's addresses or the Kubernetes API server's.",
    )
    ports: list[Port] = Field(
        default_factory=list, max_length=MAX_PORTS, description="Destination ports. Default: every port.",
    )
    protocol: Literal["TCP", "UDP"] = Field(default="TCP", description="Protocol of the ports.")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        # the API server would refuse the NetworkPolicy only after the RayJob's turn had come
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError("not an address block: write it as address/prefix, e.g. 10.20.0.0/16 or 2001:db8::/64") from None
        if "/" not in value:
            raise ValueError(f"no prefix length: write {network.with_prefixlen}")
        if ipaddress.ip_address(value.split("/")[0]) != network.network_address:
            raise ValueError(f"host bits set: the block is {network.with_prefixlen}; write that")
        return value


class NetworkSpec(SpecModel):
    """The job's NetworkPolicy, as far as the author decides it: outgoing connections."""

    egress: list[EgressRule] | None = Field(
        default=None, max_length=MAX_EGRESS_RULES,
        description="Restrict the Ray pods' outgoing connections to these destinations, plus DNS (port 53) "
                    "and the job's own pods; [] allows only those two. Default: unrestricted. List the S3 "
                    "endpoint (spec.storage) and anything the run downloads from; a cluster whose CNI does not "
                    "enforce NetworkPolicies ignores it.",
    )

"""Just enough of Kubernetes' protobuf encoding to accept kubectl's typed writes.

kubectl's imperative generators (`kubectl create namespace|configmap|secret|serviceaccount`) send
built-in kinds as `application/vnd.kubernetes.protobuf` only. A real server decodes them with the
generated schemas; here a tiny wire-format reader covers ObjectMeta and those four kinds, and
anything else gets 415 (use `kubectl create -f` with YAML, which is sent as JSON).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from . import errors

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs: ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise errors.bad_request(f"unsupported protobuf wire type {wire}")
        yield number, value


def _map(entries: list[bytes], binary: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for entry in entries:
        fields = dict(_fields(entry))
        key, value = fields.get(1, b"").decode(), fields.get(2, b"")
        result[key] = base64.b64encode(value).decode() if binary else value.decode()
    return result


def _group(data: bytes) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for number, value in _fields(data):
        grouped.setdefault(number, []).append(value)
    return grouped


def _metadata(data: bytes) -> dict[str, Any]:
    f = _group(data)
    meta: dict[str, Any] = {}
    for number, name in ((1, "name"), (2, "generateName"), (3, "namespace")):
        if f.get(number) and f[number][0]:
            meta[name] = f[number][0].decode()
    if f.get(11):
        meta["labels"] = _map(f[11])
    if f.get(12):
        meta["annotations"] = _map(f[12])
    if f.get(14):
        meta["finalizers"] = [v.decode() for v in f[14]]
    return meta


def _first(f: dict[int, list[Any]], number: int) -> Any:
    return f[number][0] if f.get(number) else None


def decode(body: bytes) -> dict[str, Any]:
    """Decode a protobuf-enveloped ConfigMap, Secret, Namespace or ServiceAccount into JSON form."""
    if not body.startswith(MAGIC):
        raise errors.bad_request("protobuf body without the k8s envelope")
    envelope = _group(body[len(MAGIC):])
    type_meta = _group(_first(envelope, 1) or b"")
    api_version = (_first(type_meta, 1) or b"").decode()
    kind = (_first(type_meta, 2) or b"").decode()
    raw = _group(_first(envelope, 2) or b"")
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": _metadata(_first(raw, 1) or b"")}
    if kind == "ConfigMap":
        if raw.get(2):
            obj["data"] = _map(raw[2])
        if raw.get(3):
            obj["binaryData"] = _map(raw[3], binary=True)
    elif kind == "Secret":
        if raw.get(2):
            obj["data"] = _map(raw[2], binary=True)
        if raw.get(3):
            obj["type"] = raw[3][0].decode()
        if raw.get(4):
            obj["stringData"] = _map(raw[4])
    elif kind not in ("Namespace", "ServiceAccount"):
        raise errors.ApiError(415, "UnsupportedMediaType", f"the emulator cannot decode protobuf {kind}; send JSON or YAML (kubectl create -f)", {})
    return obj

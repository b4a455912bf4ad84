"""The four PATCH flavours a real API server accepts, applied to plain JSON objects.

kubectl picks the content type per resource: strategic merge for built-ins, JSON merge patch for
custom resources, JSON patch on `--type=json`, and `application/apply-patch+yaml` for
`--server-side`. Strategic merge covers the list merge keys of the built-in kinds the emulator serves.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import jsonpointer
import yaml

from . import errors, protobuf

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
SUPPORTED = (MERGE, JSON_PATCH, STRATEGIC, APPLY)


def decode_body(body: bytes, content_type: str) -> Any:
    """JSON for everything but server-side apply, whose YAML is usually JSON too (so try that first)."""
    if not body:
        return None
    if content_type.startswith(protobuf.CONTENT_TYPE):
        return protobuf.decode(body)
    try:
        return json.loads(body)
    except ValueError:
        if content_type != APPLY:
            raise errors.bad_request("the request body is not valid JSON") from None
    try:
        return yaml.safe_load(body)
    except yaml.YAMLError as exc:
        raise errors.bad_request(f"error decoding YAML: {exc}") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, `null` deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that strategic merge patch merges item by item, and the key it matches items on.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "imagePullSecrets": "name", "ownerReferences": "uid", "conditions": "type",
    "ports": ("containerPort", "port"), "hostAliases": "ip",
}
# Lists of scalars merged as sets (`patchStrategy: merge` on a primitive list).
MERGED_SCALAR_LISTS = ("finalizers",)


def _item_key(item: Any, key: str | tuple[str, ...]) -> Any:
    keys = (key,) if isinstance(key, str) else key
    return next((item.get(k) for k in keys if isinstance(item, dict) and k in item), None)


def _merge_list(old: list[Any], new: list[Any], key: str | tuple[str, ...]) -> list[Any]:
    merged = [copy.deepcopy(item) for item in old]
    for item in new:
        match = next((i for i, o in enumerate(merged) if _item_key(o, key) == _item_key(item, key)), None)
        if isinstance(item, dict) and item.get("$patch") == "delete":
            if match is not None:
                del merged[match]
        elif match is None:
            merged.append(strategic_merge({}, item))
        else:
            merged[match] = strategic_merge(merged[match], item)
    return merged


def strategic_merge(target: Any, patch: Any) -> Any:
    """Strategic merge patch for the built-in kinds: like merge patch, but known lists merge by key.

    kubectl sends it for built-ins (`kubectl apply` of a Service or Pod); replacing those lists
    wholesale would drop containers or ports that a three-way patch only mentions by key.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in copy.deepcopy(patch).items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder, $retainKeys: ordering and pruning hints only
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, MERGE_KEYS[key])
        elif isinstance(value, list) and key in MERGED_SCALAR_LISTS and isinstance(result.get(key), list):
            result[key] = result[key] + [v for v in value if v not in result[key]]
        else:
            result[key] = strategic_merge(result.get(key), value)
    return result


def apply_patch(target: dict[str, Any], patch: Any, content_type: str, custom: bool = False) -> dict[str, Any]:
    """Return the patched copy of `target`; invalid patches are 422 like on the real server.

    Strategic merge on a custom resource is plain merge patch here (the real server refuses it
    with 415; being lenient keeps hand-written test patches simple).
    """
    if content_type == JSON_PATCH:
        if not isinstance(patch, list):
            raise errors.unprocessable("the server rejected our request due to an error in our request")
        try:
            return jsonpatch.apply_patch(target, patch)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise errors.unprocessable(f"the server rejected our request due to an error in our request: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, KeyError, IndexError, TypeError) as exc:
            raise errors.unprocessable(f"the server rejected our request due to an error in our request: {exc}") from None
    if not isinstance(patch, dict):
        raise errors.bad_request("the patch must be a JSON object")
    if content_type == STRATEGIC and not custom:
        return strategic_merge(target, patch)
    if content_type == STRATEGIC:
        patch = strategic_merge({}, patch)  # drops the $-directives
    return merge_patch(target, patch)

"""Render a kustomization the way ``kubectl apply -k`` would, for the fields ours use,
and validate Kubernetes, KEDA and Kustomization documents against the vendored schemas.

Only what ``deploy/kubernetes`` uses is implemented: ``resources`` (files and
directories), ``patches`` (strategic-merge patches, ``$patch: delete`` included),
``namespace`` and ``images``. The Kustomization schema refuses any other field, so a
field added there without being rendered here fails the tests instead of passing
unchecked.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
#: The Kubernetes version the manifests are checked against (see vendor_schemas.py).
K8S_SCHEMAS = SCHEMAS / "k8s-1.32.0"
KEDA_SCHEMAS = SCHEMAS / "keda-2.16"
#: Merge keys of the built-in lists our patches touch (strategic merge); any other list,
#: and every list of a custom resource, is replaced whole, as kustomize does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}

Resource = dict[str, Any]


def load_documents(path: Path) -> list[Resource]:
    """Every YAML document in ``path`` (empty ones skipped)."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


@functools.cache
def _validator(schema_path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def schema_for(document: Resource) -> Path:
    """The vendored schema of ``document``'s kind; ``LookupError`` if none is vendored."""
    kind = str(document.get("kind"))
    api = str(document.get("apiVersion"))
    if api.startswith("kustomize.config.k8s.io/"):
        return SCHEMAS / "Kustomization.json"
    folder = KEDA_SCHEMAS if api.startswith("keda.sh/") else K8S_SCHEMAS
    path = folder / f"{kind}.json"
    if not path.exists():
        raise LookupError(f"no schema vendored for {api} {kind} (tests/deploy/vendor_schemas.py)")
    return path


def errors(document: Resource) -> list[str]:
    """Every way ``document`` breaks its schema, as ``path: message`` lines."""
    validator = _validator(schema_for(document))
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    ]


def merge(base: Any, patch: Any, *, builtin: bool) -> Any:
    """``patch`` merged into ``base`` (strategic merge for built-in kinds)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if key.startswith("$"):
                raise ValueError(f"unsupported patch directive {key!r}")
            if key in merged and isinstance(merged[key], list) and isinstance(value, list):
                merged[key] = _merge_list(key, merged[key], value, builtin=builtin)
            elif key in merged:
                merged[key] = merge(merged[key], value, builtin=builtin)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    return copy.deepcopy(patch)


def _merge_list(key: str, base: list[Any], patch: list[Any], *, builtin: bool) -> list[Any]:
    merge_key = MERGE_KEYS.get(key) if builtin else None
    if merge_key is None:
        return copy.deepcopy(patch)
    merged = list(base)
    for item in patch:
        index = next((i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]), None)
        if index is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[index] = merge(merged[index], item, builtin=builtin)
    return merged


def _same(resource: Resource, patch: Resource) -> bool:
    return (
        resource["apiVersion"] == patch["apiVersion"]
        and resource["kind"] == patch["kind"]
        and resource["metadata"]["name"] == patch["metadata"]["name"]
    )


def render(directory: Path) -> list[Resource]:
    """The resources ``directory/kustomization.yaml`` makes.

    Raises:
        ValueError: the kustomization breaks its schema, or a patch matches nothing.
    """
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    problems = errors(kustomization)
    if problems:
        raise ValueError(f"{directory / 'kustomization.yaml'}: {problems}")
    resources: list[Resource] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("patches", []):
        (patch,) = load_documents(directory / entry["path"])
        matches = [i for i, resource in enumerate(resources) if _same(resource, patch)]
        if len(matches) != 1:
            raise ValueError(f"patch {entry['path']} matches {len(matches)} resources, not 1")
        if patch.get("$patch") == "delete":
            del resources[matches[0]]
            continue
        group = patch["apiVersion"].rpartition("/")[0]
        builtin = "." not in group  # apps/v1, policy/v1, v1; not keda.sh/v1alpha1
        resources[matches[0]] = merge(resources[matches[0]], patch, builtin=builtin)
    if "namespace" in kustomization:
        for resource in resources:
            resource["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for container in containers(resources):
            if container["image"].split(":")[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    return resources


def containers(resources: list[Resource]) -> list[dict[str, Any]]:
    """Every container of every Deployment in ``resources``."""
    return [
        container
        for resource in resources
        if resource["kind"] == "Deployment"
        for container in resource["spec"]["template"]["spec"]["containers"]
    ]


def one(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The one resource of ``kind`` (and ``name``)."""
    found = [
        r
        for r in resources
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} resources named {name!r}, not 1")
    return found[0]

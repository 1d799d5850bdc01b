"""Regenerate the vendored JSON schemas in ``tests/deploy/schemas/`` (run by hand).

    pip install kubernetes-validate==1.37.0 check-jsonschema==0.39.0
    python -m tests.deploy.vendor_schemas

- ``k8s-<version>/<kind>.json``: the strict schema (``additionalProperties: false``, as
  ``kubeconform -strict`` uses) of each Kubernetes kind the manifests use, from the
  ``kubernetes-validate`` package (itself generated from Kubernetes' OpenAPI document),
  each made self-contained: only the definitions it reaches, descriptions dropped;
- ``compose-spec.json``: the Compose Specification's schema as ``check-jsonschema``
  vendors it (``LICENSE.compose-spec`` beside it).

The KEDA and Kustomization schemas are written by hand (see their ``$comment``).
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path
from typing import Any

#: The Kubernetes version the manifests target.
K8S_VERSION = "1.32.0"
#: kind -> kubernetes-validate's file name (strict variant).
K8S_KINDS = {
    "ConfigMap": "configmap-v1.json",
    "Deployment": "deployment-apps-v1.json",
    "PodDisruptionBudget": "poddisruptionbudget-policy-v1.json",
}
SCHEMAS = Path(__file__).parent / "schemas"
_PREFIX = "/api/_definitions.json#/$defs/"


def _refs(node: Any) -> set[str]:
    """Every definition name ``node`` refers to."""
    if isinstance(node, dict):
        found = set()
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[1])
            else:
                found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    return set()


def _clean(node: Any) -> Any:
    """``node`` without descriptions, its references pointing into its own ``$defs``."""
    if isinstance(node, dict):
        return {
            key: ("#/$defs/" + value.rsplit("/", 1)[1] if key == "$ref" else _clean(value))
            for key, value in node.items()
            if key != "description" or not isinstance(value, str)
        }
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return node


def k8s_schema(source: Path, file_name: str) -> dict[str, Any]:
    """The self-contained schema of one kind."""
    root = json.loads((source / file_name).read_text())
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    needed: set[str] = set()
    todo = _refs(root)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo |= _refs(definitions[name])
    schema = _clean(root)
    schema.pop("$id", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$defs"] = {name: _clean(definitions[name]) for name in sorted(needed)}
    return schema


def main() -> None:
    """Write every vendored schema."""
    package = importlib.resources.files("kubernetes_validate")
    source = Path(str(package)) / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    target = SCHEMAS / f"k8s-{K8S_VERSION}"
    target.mkdir(parents=True, exist_ok=True)
    for kind, file_name in K8S_KINDS.items():
        schema = k8s_schema(source, file_name)
        (target / f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    vendor = Path(str(importlib.resources.files("check_jsonschema"))) / "builtin_schemas/vendor"
    shutil.copyfile(vendor / "compose-spec.json", SCHEMAS / "compose-spec.json")
    shutil.copyfile(vendor / "licenses/LICENSE.compose-spec", SCHEMAS / "LICENSE.compose-spec")


if __name__ == "__main__":
    main()

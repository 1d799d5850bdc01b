"""Every manifest under deploy/kubernetes and deploy/compose.yaml validates against its
schema, offline: Kubernetes 1.32's strict schemas (from ``kubernetes-validate``), KEDA's
ScaledObject and TriggerAuthentication and the Kustomization (written from their
published definitions) and the Compose Specification (as ``check-jsonschema`` vendors
it), all in tests/deploy/schemas/. Both kustomizations are rendered too, and the
resources they make agree with each other."""

from __future__ import annotations

import copy
import json
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.deploy import artifacts, kustomize

KUSTOMIZATIONS = sorted(artifacts.KUBERNETES.rglob("kustomization.yaml"))
OVERLAYS = [path.parent for path in KUSTOMIZATIONS]


def _listed() -> tuple[set[Path], set[Path]]:
    """(resource files, patch files) the kustomizations name."""
    resources, patches = set(), set()
    for path in KUSTOMIZATIONS:
        (kustomization,) = kustomize.load_documents(path)
        for entry in kustomization["resources"]:
            target = (path.parent / entry).resolve()
            if not target.is_dir():
                resources.add(target)
        patches |= {(path.parent / p["path"]).resolve() for p in kustomization.get("patches", [])}
    return resources, patches


def _rendered(overlay: Path) -> list[kustomize.Resource]:
    return kustomize.render(overlay)


def _compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads((kustomize.SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(document)
    ]


class TestKubernetesSchemas:
    """Each manifest file, then each rendered kustomization, against the schemas."""

    def test_vendored_schemas_are_valid(self) -> None:
        """Every vendored schema is itself a valid draft 2020-12 schema."""
        paths = sorted(kustomize.SCHEMAS.rglob("*.json"))
        assert len(paths) == 7
        for path in paths:
            schema = json.loads(path.read_text(encoding="utf-8"))
            jsonschema.Draft202012Validator.check_schema(schema)

    def test_every_yaml_is_accounted_for(self) -> None:
        """Every YAML file is a kustomization, a resource or a patch one of them names,
        so none escapes validation."""
        resources, patches = _listed()
        files = {p.resolve() for p in artifacts.KUBERNETES.rglob("*.y*ml")}
        assert files == resources | patches | {p.resolve() for p in KUSTOMIZATIONS}

    @pytest.mark.parametrize(
        "path", sorted(_listed()[0]), ids=lambda p: str(p.relative_to(artifacts.KUBERNETES))
    )
    def test_resource_file(self, path: Path) -> None:
        """A resource file validates on its own, before any patch."""
        for document in kustomize.load_documents(path):
            assert kustomize.errors(document) == [], path

    @pytest.mark.parametrize(
        "overlay", OVERLAYS, ids=lambda p: str(p.relative_to(artifacts.KUBERNETES))
    )
    def test_rendered(self, overlay: Path) -> None:
        """What the kustomization makes (patches applied) validates, in its namespace."""
        (kustomization,) = kustomize.load_documents(overlay / "kustomization.yaml")
        assert kustomize.errors(kustomization) == []
        rendered = _rendered(overlay)
        assert rendered
        for resource in rendered:
            assert kustomize.errors(resource) == [], resource["kind"]
            assert resource["metadata"]["namespace"] == "mailworker"

    def test_schemas_refuse_mistakes(self) -> None:
        """(The check can fail) an unknown field, a number where KEDA wants a string,
        an unknown scaler option and a wrong type are each refused."""
        rendered = _rendered(artifacts.KUBERNETES / "base")
        deployment = copy.deepcopy(kustomize.one(rendered, "Deployment"))
        deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
        assert kustomize.errors(deployment)
        deployment = copy.deepcopy(kustomize.one(rendered, "Deployment"))
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "300"
        assert kustomize.errors(deployment)
        scaled = copy.deepcopy(kustomize.one(rendered, "ScaledObject"))
        scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 40
        assert kustomize.errors(scaled)
        scaled = copy.deepcopy(kustomize.one(rendered, "ScaledObject"))
        scaled["spec"]["triggers"][0]["metadata"]["queueLength"] = "40"
        assert kustomize.errors(scaled)


class TestKubernetesConsistency:
    """The rendered resources fit together and keep the delivery guarantees."""

    @pytest.mark.parametrize(
        "overlay", OVERLAYS, ids=lambda p: str(p.relative_to(artifacts.KUBERNETES))
    )
    def test_references_resolve(self, overlay: Path) -> None:
        """The PodDisruptionBudget and the ScaledObject target the Deployment's pods,
        and every TriggerAuthentication a trigger names exists."""
        rendered = _rendered(overlay)
        deployment = kustomize.one(rendered, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        pdb = kustomize.one(rendered, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        scaled = kustomize.one(rendered, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        for trigger in scaled["spec"]["triggers"]:
            kustomize.one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert len([r for r in rendered if r["kind"] == "TriggerAuthentication"]) == len(
            scaled["spec"]["triggers"]
        )

    @pytest.mark.parametrize(
        "overlay", OVERLAYS, ids=lambda p: str(p.relative_to(artifacts.KUBERNETES))
    )
    def test_scaling(self, overlay: Path) -> None:
        """KEDA watches the queue the workers consume, never scales to zero (delayed
        retries move back from inside the workers) and scales down slowly."""
        rendered = _rendered(overlay)
        launch = artifacts.kubernetes(overlay.name)
        queues = ["celery"]
        for flag in ("-Q", "--queues"):
            if flag in launch.argv:
                queues = launch.argv[launch.argv.index(flag) + 1].split(",")
        spec = kustomize.one(rendered, "ScaledObject")["spec"]
        assert spec["minReplicaCount"] >= 1
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            assert metadata.get("listName", metadata.get("queueName")) in queues
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300

    def test_pod_settings(self) -> None:
        """Requests and limits, a non-root read-only container, probes that run
        `mailworker health`, and the SMTP password as a file from a Secret."""
        rendered = _rendered(artifacts.KUBERNETES / "base")
        pod = kustomize.one(rendered, "Deployment")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"] == ["mailworker", "health"]
        launch = artifacts.kubernetes("base")
        password_file = launch.env["MAILWORKER_SMTP_PASSWORD_FILE"]
        assert launch.secret_files[password_file] == "mailworker-smtp/password"
        (configmap,) = [r for r in rendered if r["kind"] == "ConfigMap"]
        for key, value in configmap["data"].items():
            assert "PASSWORD" not in key or key.endswith("_FILE"), key
            if key.startswith("MAILWORKER_SMTP_URL"):
                assert urllib.parse.urlsplit(value).password is None


class TestCompose:
    """deploy/compose.yaml."""

    def test_schema(self) -> None:
        """It validates against the Compose Specification."""
        assert _compose_errors(artifacts.compose_file()) == []

    def test_schema_refuses_mistakes(self) -> None:
        """(The check can fail) a misspelt service key is refused."""
        document = copy.deepcopy(artifacts.compose_file())
        document["services"]["worker"]["stop_grace"] = "300s"
        assert _compose_errors(document)

    def test_services(self) -> None:
        """Redis keeps an append-only file on a volume, several workers run, the
        development server is the SMTP sink, and the password is a secret file."""
        document = artifacts.compose_file()
        services = document["services"]
        assert "--appendonly" in services["redis"]["command"]
        assert services["redis"]["volumes"] == ["redis-data:/data"]
        assert services["worker"]["deploy"]["replicas"] >= 2
        assert "mailworker devserver" in " ".join(services["smtp"]["entrypoint"])
        assert document["secrets"]["smtp_password"] == {"file": "./secrets/smtp_password"}
        launch = artifacts.compose()
        assert launch.secret_files == {"/run/secrets/smtp_password": "smtp_password"}
        assert launch.env["MAILWORKER_SMTP_PASSWORD_FILE"] == "/run/secrets/smtp_password"
        for name, value in launch.env.items():
            assert "PASSWORD" not in name or name.endswith("_FILE"), name
            if name.startswith("MAILWORKER_SMTP_URL"):
                assert urllib.parse.urlsplit(value).password is None

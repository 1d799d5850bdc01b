"""What each file under ``deploy/`` runs: the worker's command line, its environment,
where its secrets appear as files, its health check and how it is stopped.

Each reader applies its platform's own rules, so the tests run what the platform would:

- Docker/compose: ``entrypoint`` replaces the image's ENTRYPOINT and drops its CMD;
  ``command`` replaces CMD; the image's ENV and HEALTHCHECK apply unless overridden;
  a secret ``x`` is the file ``/run/secrets/x``; ``docker stop`` signals PID 1 only.
- Kubernetes: ``command`` replaces ENTRYPOINT (and drops CMD), ``args`` replaces CMD;
  ``envFrom`` a ConfigMap, then ``env``; a Secret volume's items are files under its
  ``mountPath``; the kubelet signals PID 1 only (the image's STOPSIGNAL).
- systemd: ``ExecStart`` as written, ``EnvironmentFile`` (``deploy/mailworker.env.example``,
  installed as ``/etc/mailworker/mailworker.env``), then ``Environment=``;
  ``LoadCredential=name:path`` is the file ``%d/name``; ``KillMode=mixed`` signals
  the main process only, ``control-group`` every process.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "mailworker.service"
ENV_EXAMPLE = DEPLOY / "mailworker.env.example"
#: Where the unit's EnvironmentFile= points (the example is installed there).
ENV_FILE = "/etc/mailworker/mailworker.env"
#: Stands for ``$CREDENTIALS_DIRECTORY`` (``%d``) in the unit.
CREDENTIALS = "/run/credentials/mailworker.service"


@dataclass(frozen=True)
class Launch:
    """How one deployment file starts (and stops) the worker."""

    #: Which file, for test ids and messages.
    source: str
    #: The command line, as the platform runs it.
    argv: tuple[str, ...]
    #: The environment it sets (the image's ENV included); a value from a Kubernetes
    #: Secret is ``secret:<name>/<key>``.
    env: dict[str, str]
    #: Absolute path -> the secret it holds (``<secret name>/<key>``), for every
    #: secret the platform puts in a file.
    secret_files: dict[str, str] = field(default_factory=dict)
    #: The health check's command line, if any.
    health: tuple[str, ...] | None = None
    #: The signal a stop sends, and whether to the main process only.
    stop_signal: str = "SIGTERM"
    signals_main_only: bool = True
    #: Seconds from that signal to SIGKILL.
    stop_timeout: float = 10.0


@dataclass(frozen=True)
class Image:
    """The final stage of the Dockerfile."""

    env: dict[str, str]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    health: tuple[str, ...]
    stop_signal: str
    user: str
    #: Every stage: (instruction, arguments) in order, ``FROM`` starting each.
    stages: list[list[tuple[str, str]]]


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions: continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
            current = ""
    return result


def image() -> Image:
    """The Dockerfile's final stage."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    final = dict(stages[-1])
    env: dict[str, str] = {}
    for keyword, rest in stages[-1]:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    health = final["HEALTHCHECK"]
    return Image(
        env=env,
        entrypoint=tuple(json.loads(final["ENTRYPOINT"])),
        cmd=tuple(json.loads(final["CMD"])),
        health=tuple(json.loads(health[health.index("CMD") + 3 :])),
        stop_signal=final["STOPSIGNAL"],
        user=final["USER"],
        stages=stages,
    )


def seconds(duration: str | int) -> float:
    """A compose duration (``300s``, ``5m``, ``1m30s``) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    if "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a compose duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _as_list(value: str | list[str]) -> tuple[str, ...]:
    return tuple(shlex.split(value) if isinstance(value, str) else value)


def compose_file() -> dict[str, Any]:
    """deploy/compose.yaml, parsed."""
    with COMPOSE.open(encoding="utf-8") as stream:
        loaded: dict[str, Any] = yaml.safe_load(stream)
    return loaded


def compose(service: str = "worker") -> Launch:
    """How compose runs ``service`` (built from the Dockerfile)."""
    img = image()
    spec = compose_file()["services"][service]
    if "entrypoint" in spec:
        argv = _as_list(spec["entrypoint"]) + _as_list(spec.get("command", []))
    else:
        argv = img.entrypoint + (_as_list(spec["command"]) if "command" in spec else img.cmd)
    raw_env = spec.get("environment", {})
    if isinstance(raw_env, list):
        raw_env = dict(item.split("=", 1) for item in raw_env)
    secrets = {}
    for secret in spec.get("secrets", []):
        name, target = (
            (secret, secret)
            if isinstance(secret, str)
            else (secret["source"], secret.get("target", secret["source"]))
        )
        secrets[target if target.startswith("/") else f"/run/secrets/{target}"] = name
    health = img.health
    if "healthcheck" in spec:
        test = spec["healthcheck"]["test"]
        health = tuple(test[1:]) if test[0] == "CMD" else ("sh", "-c", test[1])
    return Launch(
        source=f"compose:{service}",
        argv=argv,
        env={**img.env, **{k: str(v) for k, v in raw_env.items()}},
        secret_files=secrets,
        health=health,
        stop_signal=spec.get("stop_signal", img.stop_signal),
        stop_timeout=seconds(spec.get("stop_grace_period", "10s")),
    )


def kubernetes(overlay: str = "base") -> Launch:
    """How the Deployment of ``deploy/kubernetes/<overlay>`` runs the worker."""
    img = image()
    folder = KUBERNETES / overlay if overlay == "base" else KUBERNETES / "overlays" / overlay
    resources = kustomize.render(folder)
    pod = kustomize.one(resources, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    if "command" in container:
        argv = tuple(container["command"]) + tuple(container.get("args", ()))
    else:
        argv = img.entrypoint + tuple(container.get("args", img.cmd))
    env = dict(img.env)
    for source in container.get("envFrom", []):
        env.update(kustomize.one(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"secret:{ref['name']}/{ref['key']}"
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    secrets = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        for item in secret["items"]:
            path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
            secrets[path] = f"{secret['secretName']}/{item['key']}"
    return Launch(
        source=f"kubernetes:{overlay}",
        argv=argv,
        env=env,
        secret_files=secrets,
        health=tuple(container["startupProbe"]["exec"]["command"]),
        stop_signal=img.stop_signal,
        stop_timeout=float(pod.get("terminationGracePeriodSeconds", 30)),
    )


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit file: section -> key -> every value given (in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an environment file (comments and blank lines skipped)."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def systemd() -> Launch:
    """How systemd runs the unit (its EnvironmentFile being the example)."""
    service = unit()["Service"]
    (environment_file,) = service["EnvironmentFile"]
    if environment_file.lstrip("-") != ENV_FILE:
        raise ValueError(f"EnvironmentFile={environment_file}, expected {ENV_FILE}")
    env = env_file(ENV_EXAMPLE)
    for assignment in service.get("Environment", []):
        for item in shlex.split(assignment.replace("%d", CREDENTIALS)):
            key, _, value = item.partition("=")
            env[key] = value
    secrets = {}
    for credential in service.get("LoadCredential", []):
        name, _, source = credential.partition(":")
        secrets[f"{CREDENTIALS}/{name}"] = source
    (exec_start,) = service["ExecStart"]
    (kill_mode,) = service.get("KillMode", ["control-group"])
    return Launch(
        source="systemd",
        argv=tuple(shlex.split(exec_start)),
        env=env,
        secret_files=secrets,
        stop_signal=service.get("KillSignal", ["SIGTERM"])[-1],
        signals_main_only=kill_mode == "mixed",
        stop_timeout=seconds(service["TimeoutStopSec"][-1] + "s"),
    )


def launches() -> list[Launch]:
    """Every way the deployment files start a worker."""
    return [compose(), kubernetes("base"), kubernetes("rabbitmq"), systemd()]

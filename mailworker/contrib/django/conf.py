"""``settings.MAILWORKER``: what the Django side publishes to and what its worker needs.

Lookup order (the first one set wins):

=====================  ===============================================================
broker (publishing)    ``MAILWORKER["CELERY_APP"]`` (the project's Celery app, with its
                       broker and routes) · ``MAILWORKER["BROKER_URL"]`` ·
                       ``CELERY_BROKER_URL`` · env ``MAILWORKER_BROKER_URL`` ·
                       ``redis://localhost:6379/0``
profile of a message   ``get_connection(profile=...)`` · ``MAILWORKER["PROFILE"]`` ·
                       ``"default"``
queue                  ``get_connection(queue=...)`` · ``MAILWORKER["QUEUE"]`` · the
                       Celery app's default routing (queue ``celery``)
worker's profiles      ``MAILWORKER["PROFILES"]`` (``{name: URL}``) · else one
                       ``default`` profile from ``EMAIL_HOST``, ``EMAIL_PORT``,
                       ``EMAIL_HOST_USER``, ``EMAIL_HOST_PASSWORD``, ``EMAIL_USE_TLS``
                       (``smtp+starttls://``), ``EMAIL_USE_SSL`` (``smtps://``, else
                       ``smtp://``), ``EMAIL_TIMEOUT``, ``EMAIL_SSL_CERTFILE`` /
                       ``EMAIL_SSL_KEYFILE``
worker's default from  ``MAILWORKER["DEFAULT_FROM"]`` · ``DEFAULT_FROM_EMAIL``
=====================  ===============================================================

The worker reads its profiles from its *own* environment; :func:`worker_environ` turns
these settings into that environment (``manage.py mailworker_worker`` starts a worker with
it). Other worker settings may be given by their short name, e.g.
``MAILWORKER = {"RETRY_DELAYS": [60, 300], "MAX_AGE": 3600}`` becomes
``MAILWORKER_RETRY_DELAYS=60,300`` and ``MAILWORKER_MAX_AGE=3600``.

Django ships no type information, so settings are ``Any`` here.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

from mailworker.errors import ConfigError
from mailworker.queue.names import DEFAULT_BROKER_URL
from mailworker.queue.producer import Producer, load_celery_app, producer_app
from mailworker.smtp.profile import Profile

__all__ = [
    "DEFAULT_BROKER_URL",
    "KEYS",
    "WORKER_KEYS",
    "Problem",
    "broker_url",
    "email_settings_url",
    "problems",
    "producer",
    "profile_name",
    "profile_urls",
    "queue_name",
    "worker_environ",
]

#: Keys of ``settings.MAILWORKER`` that are passed to the worker as ``MAILWORKER_<KEY>``.
WORKER_KEYS = (
    "REDIS_URL",
    "SENTINEL_MASTER",
    "REDIS_REPLICAS",
    "RETRY_DELAYS",
    "RETRY_JITTER",
    "MAX_AGE",
    "VISIBILITY_TIMEOUT",
    "TASK_TIME_LIMIT",
    "MAX_REDELIVERIES",
    "DLQ_MAX",
    "DLQ_TTL",
    "DLQ_MAX_BYTES",
    "DLQ_MAX_PAYLOAD_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RECIPIENTS",
    "PUBLISH_TIMEOUT",
    "LOG_FORMAT",
)
#: Every key ``settings.MAILWORKER`` may have.
KEYS = (
    "BROKER_URL",
    "CELERY_APP",
    "DEFAULT_FROM",
    "PROFILE",
    "PROFILES",
    "QUEUE",
    *WORKER_KEYS,
)
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
#: The Django settings the fallback profile is built from, for messages.
_EMAIL_SETTINGS = "EMAIL_HOST/EMAIL_PORT/EMAIL_HOST_USER/EMAIL_USE_TLS/EMAIL_USE_SSL"


@dataclass(frozen=True)
class Problem:
    """A missing or malformed setting, named as the user writes it."""

    setting: str
    message: str
    hint: str | None = None
    #: ``mailworker.E0xx`` / ``mailworker.W0xx`` for Django's system checks.
    id: str = "mailworker.E001"

    @property
    def is_error(self) -> bool:
        """Whether it stops mail from working (a warning does not)."""
        return ".E" in self.id

    def __str__(self) -> str:
        text = f"{self.setting}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class _ProblemError(ConfigError):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _fail(
    setting: str, message: str, hint: str | None = None, id: str = "mailworker.E001"
) -> NoReturn:
    raise _ProblemError(Problem(setting, message, hint, id))


def _django_settings(settings: Any) -> Any:
    if settings is not None:
        return settings
    return importlib.import_module("django.conf").settings


def _key(key: str) -> str:
    return f"MAILWORKER[{key!r}]"


def _section(settings: Any) -> dict[str, Any]:
    value = getattr(settings, "MAILWORKER", None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail("MAILWORKER", f"must be a dict, not {type(value).__name__}", id="mailworker.E001")
    return dict(value)


def _optional_str(section: dict[str, Any], key: str) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        _fail(_key(key), f"must be a non-empty string, not {value!r}", id="mailworker.E002")
    return value.strip()


# -- publishing ----------------------------------------------------------------------------


def broker_url(settings: Any = None) -> str:
    """The broker the Django side publishes to (and the worker consumes from)."""
    s = _django_settings(settings)
    section = _section(s)
    url = _optional_str(section, "BROKER_URL")
    if section.get("CELERY_APP") is not None:
        if url is not None:
            _fail(
                _key("BROKER_URL"),
                "set either MAILWORKER['BROKER_URL'] or MAILWORKER['CELERY_APP'], not both",
                "the Celery app publishes to its own broker_url",
                id="mailworker.E003",
            )
        app = load_celery_app(section["CELERY_APP"], _key("CELERY_APP"))
        configured = app.conf.broker_url
        if not configured:
            _fail(_key("CELERY_APP"), "the Celery app has no broker_url", id="mailworker.E004")
        return str(configured)
    if url is not None:
        return url
    celery_url = getattr(s, "CELERY_BROKER_URL", None)
    if celery_url:
        return str(celery_url)
    return os.environ.get("MAILWORKER_BROKER_URL") or DEFAULT_BROKER_URL


def producer(settings: Any = None, *, queue: str | None = None) -> Producer:
    """What publishes the Django side's tasks: the project's app or one for the broker URL.

    Raises:
        ConfigError: a setting it needs is malformed (the message names it).
    """
    s = _django_settings(settings)
    section = _section(s)
    queue = queue or _optional_str(section, "QUEUE")
    if section.get("CELERY_APP") is not None:
        broker_url(s)  # refuses CELERY_APP together with BROKER_URL
        return Producer(load_celery_app(section["CELERY_APP"], _key("CELERY_APP")), queue=queue)
    return Producer(producer_app(broker_url(s)), queue=queue)


def queue_name(settings: Any = None) -> str | None:
    """The Celery queue of the Django side's tasks: ``MAILWORKER["QUEUE"]``, or None."""
    return _optional_str(_section(_django_settings(settings)), "QUEUE")


def profile_name(settings: Any = None) -> str:
    """The profile the backend's messages use: ``MAILWORKER["PROFILE"]`` or ``"default"``."""
    return _optional_str(_section(_django_settings(settings)), "PROFILE") or "default"


# -- the worker's side ---------------------------------------------------------------------


def email_settings_url(settings: Any = None) -> str:
    """The profile URL for Django's ``EMAIL_*`` settings (contains the password).

    Credentials are used only when both ``EMAIL_HOST_USER`` and ``EMAIL_HOST_PASSWORD``
    are set, as Django's SMTP backend does.
    """
    s = _django_settings(settings)
    use_tls = bool(getattr(s, "EMAIL_USE_TLS", False))
    use_ssl = bool(getattr(s, "EMAIL_USE_SSL", False))
    if use_tls and use_ssl:
        _fail(
            "EMAIL_USE_TLS/EMAIL_USE_SSL",
            "are mutually exclusive, so only set one of those settings to True",
            id="mailworker.E010",
        )
    scheme = "smtps" if use_ssl else "smtp+starttls" if use_tls else "smtp"
    host = str(getattr(s, "EMAIL_HOST", "localhost") or "localhost")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = getattr(s, "EMAIL_PORT", 25) or 25
    user = getattr(s, "EMAIL_HOST_USER", "") or ""
    password = getattr(s, "EMAIL_HOST_PASSWORD", "") or ""
    auth = (
        f"{quote(str(user), safe='')}:{quote(str(password), safe='')}@" if user and password else ""
    )
    options: dict[str, str] = {}
    timeout = getattr(s, "EMAIL_TIMEOUT", None)
    if timeout:
        options["timeout"] = str(timeout)
    for name, option in (
        ("EMAIL_SSL_CERTFILE", "client_cert"),
        ("EMAIL_SSL_KEYFILE", "client_key"),
    ):
        path = getattr(s, name, None)
        if path:
            options[option] = str(path)
    query = f"?{urlencode(options)}" if options else ""
    return f"{scheme}://{auth}{host}:{port}{query}"


def profile_urls(settings: Any = None) -> dict[str, str]:
    """Profile name -> URL for the worker: ``MAILWORKER["PROFILES"]``, or ``EMAIL_*``."""
    s = _django_settings(settings)
    profiles = _section(s).get("PROFILES")
    if not profiles:
        return {"default": email_settings_url(s)}
    if not isinstance(profiles, Mapping):
        _fail(
            _key("PROFILES"),
            f"must be a dict of profile name to SMTP URL, not {type(profiles).__name__}",
            id="mailworker.E020",
        )
    urls: dict[str, str] = {}
    for name, url in profiles.items():
        where = f"{_key('PROFILES')}[{name!r}]"
        if not isinstance(name, str) or not _PROFILE_NAME.match(name):
            _fail(where, "a profile name is letters, digits and _ only", id="mailworker.E021")
        if not isinstance(url, str) or not url.strip():
            _fail(
                where,
                f"must be an SMTP URL string, not {url!r}",
                "e.g. 'smtps://user:password@smtp.example.com'",
                id="mailworker.E022",
            )
        urls[name] = url.strip()
    return urls


def _env_var(name: str) -> str:
    return "MAILWORKER_SMTP_URL" if name == "default" else f"MAILWORKER_SMTP_URL_{name.upper()}"


def _env_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def worker_environ(settings: Any = None) -> dict[str, str]:
    """The ``MAILWORKER_*`` environment of a worker for these settings.

    It holds the SMTP passwords: hand it to the worker process, don't log it.

    Raises:
        ConfigError: a setting is missing or malformed (the first one found is named).
    """
    s = _django_settings(settings)
    for problem in problems(s):
        if problem.is_error:
            raise _ProblemError(problem)
    section = _section(s)
    env = {"MAILWORKER_BROKER_URL": broker_url(s)}
    for name, url in profile_urls(s).items():
        env[_env_var(name)] = url
    default_from = section.get("DEFAULT_FROM") or getattr(s, "DEFAULT_FROM_EMAIL", None)
    if default_from:
        env["MAILWORKER_DEFAULT_FROM"] = str(default_from)
    for key in WORKER_KEYS:
        if section.get(key) is not None:
            env[f"MAILWORKER_{key}"] = _env_value(section[key])
    return env


# -- validation ----------------------------------------------------------------------------


def problems(settings: Any = None) -> list[Problem]:
    """Every missing or malformed setting (what the system checks report)."""
    s = _django_settings(settings)
    try:
        section = _section(s)
    except _ProblemError as exc:
        return [exc.problem]
    found: list[Problem] = []
    for check in (_check_keys, _check_publishing, _check_profiles, _check_worker_settings):
        try:
            found.extend(check(s, section))
        except _ProblemError as exc:
            found.append(exc.problem)
        except ConfigError as exc:
            found.append(Problem("MAILWORKER", str(exc)))
    return found


def _check_keys(_s: Any, section: dict[str, Any]) -> Iterator[Problem]:
    for key in section:
        if key not in KEYS:
            yield Problem(
                _key(str(key)),
                "unknown key",
                "known keys: " + ", ".join(sorted(KEYS)),
                id="mailworker.E005",
            )


def _check_publishing(s: Any, section: dict[str, Any]) -> Iterator[Problem]:
    for key in ("QUEUE", "PROFILE", "DEFAULT_FROM"):
        try:
            _optional_str(section, key)
        except _ProblemError as exc:
            yield exc.problem
    try:
        url = broker_url(s)
    except _ProblemError as exc:
        yield exc.problem
        return
    except ConfigError as exc:  # CELERY_APP cannot be imported
        message = str(exc).removeprefix(f"{_key('CELERY_APP')}: ")
        yield Problem(_key("CELERY_APP"), message, id="mailworker.E004")
        return
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _REDIS_SCHEMES and not section.get("REDIS_URL"):
        yield Problem(
            _key("CELERY_APP") if section.get("CELERY_APP") else _key("BROKER_URL"),
            f"the broker is {scheme}://, and mailworker keeps its retries and dead letters "
            "in Redis",
            "use a redis:// broker or set MAILWORKER['REDIS_URL']",
            id="mailworker.W001",
        )


def _check_profiles(s: Any, section: dict[str, Any]) -> Iterator[Problem]:
    from_email = not section.get("PROFILES")
    urls = profile_urls(s)
    for name, url in urls.items():
        password = None
        parts = urlsplit(url)
        if parts.username and parts.password is None:
            # The worker may read it from MAILWORKER_SMTP_PASSWORD[_<NAME>].
            password = "placeholder"  # noqa: S105 -- only to validate the rest
        try:
            Profile.from_url(url, name=name, password=password)
        except ConfigError as exc:
            message = str(exc).removeprefix(f"profile {name!r}: ")
            if from_email:
                yield _email_problem(message, clear_text="clear text" in message)
            else:
                yield Problem(
                    f"{_key('PROFILES')}[{name!r}]",
                    message,
                    "e.g. 'smtps://user:password@smtp.example.com:465'",
                    id="mailworker.E023",
                )
    profile = _optional_str(section, "PROFILE") or "default"
    if profile not in urls:
        where = "MAILWORKER['PROFILES']" if not from_email else "the EMAIL_* settings' profiles"
        yield Problem(
            _key("PROFILE"),
            f"no profile {profile!r} in {where}",
            "profiles: " + ", ".join(sorted(urls)),
            id="mailworker.E024",
        )


def _email_problem(message: str, *, clear_text: bool) -> Problem:
    if clear_text:
        return Problem(
            "EMAIL_HOST_USER",
            "credentials are set but neither EMAIL_USE_TLS nor EMAIL_USE_SSL: mailworker "
            "does not send a password in clear text",
            "set EMAIL_USE_TLS = True (STARTTLS) or EMAIL_USE_SSL = True, "
            "or give MAILWORKER['PROFILES']",
            id="mailworker.E011",
        )
    return Problem(
        _EMAIL_SETTINGS,
        f"the SMTP profile built from Django's EMAIL_* settings is invalid: {message}",
        "fix the EMAIL_* settings or give MAILWORKER['PROFILES']",
        id="mailworker.E012",
    )


def _check_worker_settings(_s: Any, section: dict[str, Any]) -> Iterator[Problem]:
    # Validated as the worker will read them; imported here, not by the web process's
    # EmailBackend.
    from mailworker.worker.settings import Settings  # noqa: PLC0415

    env: dict[str, str] = {}
    for key in WORKER_KEYS:
        if section.get(key) is None:
            continue
        var = f"MAILWORKER_{key}"
        value = _env_value(section[key])
        try:
            Settings.from_env({var: value})
        except ConfigError as exc:
            yield Problem(_key(key), str(exc), id="mailworker.E030")
            continue
        env[var] = value
    try:
        Settings.from_env(env)
    except ConfigError as exc:
        yield Problem(_key("TASK_TIME_LIMIT"), str(exc), id="mailworker.E031")

"""The ``oauth*`` options of a profile URL: which token provider they describe.

``oauth=google|microsoft`` (a preset: token URL and scope) or ``oauth_token_url`` with
``oauth_client_id``, ``oauth_refresh_token_file`` and, for a confidential client,
``oauth_client_secret_file`` build a :class:`~mailworker.smtp.oauth.RefreshTokenProvider`;
``oauth_scope`` and ``oauth_tenant`` (Microsoft) adjust it. ``oauth_token_provider=
package.module:callable`` names a provider of your own instead.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

from mailworker.errors import ConfigError
from mailworker.smtp.oauth import PRESETS, RefreshTokenProvider, TokenProvider, check_token_url

#: Profile URL options read by :func:`provider_from_options`.
OPTIONS = (
    "oauth",
    "oauth_client_id",
    "oauth_client_secret_file",
    "oauth_refresh_token_file",
    "oauth_scope",
    "oauth_tenant",
    "oauth_token_provider",
    "oauth_token_url",
)
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_option(key: str, value: str) -> str:
    """Check one ``oauth*`` URL option on its own (:func:`provider_from_options` checks
    them together)."""
    if not value or "\r" in value or "\n" in value:
        raise ConfigError(f"option {key}={value!r}: must be one non-empty line")
    if key == "oauth" and value not in PRESETS:
        raise ConfigError(f"option {key}={value!r}: choose {' or '.join(PRESETS)}")
    if key == "oauth_tenant" and not _TENANT.match(value):
        raise ConfigError(f"option {key}={value!r}: expected a tenant id or domain")
    if key == "oauth_token_url":
        check_token_url(value)
    if key.endswith("_file") and not Path(value).is_file():
        raise ConfigError(f"option {key}={value!r}: no such file")
    if key == "oauth_token_provider" and not _CALLABLE.match(value):
        raise ConfigError(f"option {key}={value!r}: expected package.module:callable")
    return value


def provider_from_options(options: Mapping[str, str]) -> TokenProvider:
    """The token provider the ``oauth*`` options of a profile URL describe.

    Raises:
        ConfigError: options missing, conflicting or unusable; names the option.
    """
    if "oauth_token_provider" in options:
        others = sorted(set(options) - {"oauth_token_provider"})
        if others:
            raise ConfigError(
                f"oauth_token_provider replaces the built-in provider; drop {', '.join(others)}"
            )
        return load_provider(options["oauth_token_provider"])
    name = options.get("oauth")
    preset = PRESETS[name] if name else None
    if "oauth_tenant" in options and name != "microsoft":
        raise ConfigError("oauth_tenant: only for oauth=microsoft")
    token_url = options.get("oauth_token_url")
    if token_url is None and preset is not None:
        token_url = preset.token_url.format(tenant=options.get("oauth_tenant", "common"))
    if token_url is None:
        raise ConfigError(
            "set oauth=google or oauth=microsoft, or oauth_token_url for another OAuth2 server"
        )
    _require(options, "oauth_client_id", "oauth_refresh_token_file")
    return RefreshTokenProvider(
        token_url=token_url,
        client_id=options["oauth_client_id"],
        client_secret_file=options.get("oauth_client_secret_file"),
        refresh_token_file=options["oauth_refresh_token_file"],
        scope=options.get("oauth_scope", preset.scope if preset else None),
    )


def _require(options: Mapping[str, str], *names: str) -> None:
    missing = [n for n in names if n not in options]
    if missing:
        raise ConfigError(f"the OAuth refresh-token grant needs {' and '.join(missing)}")


def load_provider(spec: str) -> TokenProvider:
    """Import the callable ``package.module:callable`` names.

    Raises:
        ConfigError: it cannot be imported or is not callable.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"oauth_token_provider={spec!r}: cannot import it ({type(exc).__name__}: {exc})"
        ) from None
    if not callable(target):
        raise ConfigError(f"oauth_token_provider={spec!r}: is not callable")
    return target

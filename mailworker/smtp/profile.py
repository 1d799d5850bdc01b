"""SMTP profiles, parsed from URLs and the environment.

The URL scheme fixes the transport security, and nothing downgrades it:

======================================  ====================================
``smtps://user:pass@host[:465]``        implicit TLS
``smtp+starttls://user:pass@host[:587]``  STARTTLS, required (alias ``submission://``)
``smtp://host[:25]``                    clear text, for a local relay; AUTH
                                        refused unless ``allow_insecure_auth``
======================================  ====================================

Environment (``<NAME>`` is the upper-cased profile name; none for ``default``):

- ``MAILWORKER_SMTP_URL`` / ``MAILWORKER_SMTP_URL_<NAME>``
- ``MAILWORKER_SMTP_PASSWORD[_<NAME>]`` or ``MAILWORKER_SMTP_PASSWORD[_<NAME>]_FILE``
- ``MAILWORKER_SMTP_OAUTH_TOKEN[_<NAME>]`` or ``MAILWORKER_SMTP_OAUTH_TOKEN[_<NAME>]_FILE``
  (or a token provider named by the URL's ``oauth*`` options, :mod:`mailworker.smtp.oauth`)

A secret's file variable is its variable with ``_FILE`` appended, as Docker images do
(``POSTGRES_PASSWORD_FILE``): ``MAILWORKER_SMTP_PASSWORD_BULK_FILE`` for profile ``bulk``.
The spelling ``MAILWORKER_SMTP_PASSWORD_FILE_BULK`` is refused with an error naming the
right one.

Profile names are case-insensitive: they are lower-cased once
(:func:`normalize_profile_name`), so ``Bulk`` and ``bulk`` are one profile, one session.

Provider limits (:class:`FleetLimits`, ``Profile.fleet``) hold for the whole fleet, not one
process; the worker enforces them through Redis (:mod:`mailworker.store.limits`):

==================================  ===============================================
``rate=10/s`` (``/m``, ``/h``)      messages per second, minute or hour; ``0.5/s`` too
``max_connections=4``               SMTP sessions open at once
``fallback=backup[,other]``         profiles to send through while the breaker is open
``breaker_failures=5``              consecutive failures that open the breaker...
``breaker_window=60``               ...when all fall within this many seconds
``breaker_reset=30``                seconds open before one probe message may go
``throttle_backoff=2``              seconds nobody connects after a 421 / 4.7.x reply,
``throttle_backoff_max=60``         doubling per consecutive one up to this
==================================  ===============================================

The last five show their defaults; without the first three there is no limit and no
fallback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from mailworker.errors import ConfigError
from mailworker.smtp import _oauth_options, oauth
from mailworker.smtp.limits import FleetLimits, Rate, _number, normalize_profile_name

Security = Literal["tls", "starttls", "none"]

#: URL scheme -> (security, default port).
SCHEMES: dict[str, tuple[Security, int]] = {
    "smtps": ("tls", 465),
    "smtp+starttls": ("starttls", 587),
    "submission": ("starttls", 587),
    "smtp": ("none", 25),
}

#: AUTH mechanisms we implement, in the default order of preference.
AUTH_MECHANISMS = ("XOAUTH2", "CRAM-MD5", "PLAIN", "LOGIN")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: RFC 5321 Domain or address literal; rules out CR/LF and spaces in the EHLO name.
_HOSTNAME = re.compile(r"^(\[[0-9A-Fa-f:.Iv]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")
_HOST = re.compile(r"^[A-Za-z0-9._:-]+$")
#: A DKIM domain or selector (RFC 6376 §3.1, §3.5): LDH labels (IDNs as A-labels).
_DKIM_NAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class Timeouts:
    """Per-stage timeouts in seconds; defaults from RFC 5321 §4.5.3.2.

    ``connect`` covers the TCP connect and the TLS handshake; ``command`` covers
    EHLO, STARTTLS, AUTH, RSET and NOOP (RFC 5321 names none; 5 minutes like MAIL);
    ``quit`` is short because nothing depends on its answer.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 10.0

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every stage with the same timeout (the ``timeout=`` URL option)."""
        return cls(**{f.name: seconds for f in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"timeouts.{f.name}: must be a positive number of seconds")


#: Returns a current OAuth2 bearer token: ``get_token(*, refresh: bool) -> str``, called
#: at every (re)connect and once with ``refresh=True`` after a refused token
#: (:mod:`mailworker.smtp.oauth`); a zero-argument callable is accepted too.
TokenProvider = oauth.TokenProvider


@dataclass(frozen=True)
class Profile:
    """Where and how to connect to one SMTP server.

    Build one from a URL or the environment rather than by hand::

        profile = Profile.from_url("smtps://app%40example.com:s3cret@smtp.example.com")
        profile = Profile.from_env()          # MAILWORKER_SMTP_URL
        profile = Profile.from_env("bulk")    # MAILWORKER_SMTP_URL_BULK

    Secrets are never part of ``repr()`` or of any error message.
    """

    host: str
    port: int
    security: Security = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    oauth_token_provider: TokenProvider | None = field(default=None, repr=False, compare=False)
    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    auth: tuple[str, ...] = AUTH_MECHANISMS
    timeouts: Timeouts = field(default_factory=Timeouts)
    local_hostname: str | None = None
    max_messages: int = 100
    #: Seconds a session may sit idle before a NOOP checks it is still alive.
    noop_after: float = 10.0
    allow_insecure_auth: bool = False
    #: DKIM: the signing domain (``d=``), the selector (``s=``) and the private key file;
    #: all three or none. The worker reads and checks the key when it starts
    #: (:mod:`mailworker.message.dkim`); a process that only publishes never needs it.
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_key_file: str | None = None
    #: Limits held by the whole fleet (rate, connections, breaker, fallbacks).
    fleet: FleetLimits = field(default_factory=FleetLimits)
    name: str = "default"

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if not self.host or not _HOST.match(self.host):
            raise ConfigError(f"{where}: host {self.host!r} is not a valid host name or address")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}: port {self.port} is out of range 1-65535")
        if self.security not in ("tls", "starttls", "none"):
            raise ConfigError(f"{where}: security must be 'tls', 'starttls' or 'none'")
        for mech in self.auth:
            if mech not in AUTH_MECHANISMS:
                raise ConfigError(
                    f"{where}: auth mechanism {mech!r} is not supported; "
                    f"choose from {', '.join(AUTH_MECHANISMS)}"
                )
        if not self.auth:
            raise ConfigError(f"{where}: auth needs at least one mechanism")
        if self.local_hostname is not None and not _HOSTNAME.match(self.local_hostname):
            raise ConfigError(
                f"{where}: local_hostname {self.local_hostname!r} must be a domain name "
                "or an address literal like [192.0.2.1]"
            )
        if self.max_messages < 1:
            raise ConfigError(f"{where}: max_messages must be at least 1")
        if self.noop_after < 0:
            raise ConfigError(f"{where}: noop_after must not be negative")
        if self.client_key and not self.client_cert:
            raise ConfigError(f"{where}: client_key needs client_cert")
        for text in (self.username, self.password):
            if text is not None and ("\r" in text or "\n" in text):
                raise ConfigError(f"{where}: username and password must not contain CR or LF")
        if self.username is not None and self.password is None and not self.oauth_token_provider:
            var = f"MAILWORKER_SMTP_PASSWORD{_suffix(self.name)}"
            raise ConfigError(
                f"{where}: user {self.username!r} has no password; put it in the URL or "
                f"set {var} (or {var}_FILE)"
            )
        if self.oauth_token_provider is not None and self.username is None:
            raise ConfigError(f"{where}: XOAUTH2 needs the user name in the URL")
        if self.security == "none" and self.wants_auth and not self.allow_insecure_auth:
            raise ConfigError(
                f"{where}: refusing to send credentials over clear text (smtp://); "
                "use smtps:// or smtp+starttls://, or add ?allow_insecure_auth=true "
                "for a trusted local relay"
            )
        self._check_dkim(where)
        if normalize_profile_name(self.name) in self.fleet.fallback:
            raise ConfigError(
                f"{where}: fallback names the profile itself; list other profiles "
                "(MAILWORKER_SMTP_URL_<NAME>) to send through while it is down"
            )

    def _check_dkim(self, where: str) -> None:
        names = {"dkim_domain": self.dkim_domain, "dkim_selector": self.dkim_selector}
        for option, value in names.items():
            if value is not None and not (_DKIM_NAME.fullmatch(value) and len(value) < 254):
                raise ConfigError(f"{where}: {option} {value!r} is not a domain name")
        missing = [o for o, v in {**names, "dkim_key_file": self.dkim_key_file}.items() if not v]
        if len(missing) in (1, 2):
            raise ConfigError(
                f"{where}: DKIM signing needs dkim_domain, dkim_selector and dkim_key_file "
                f"together; {' and '.join(missing)} missing"
            )

    @property
    def wants_auth(self) -> bool:
        """Whether the session should authenticate."""
        return self.username is not None or self.oauth_token_provider is not None

    @property
    def uses_tls(self) -> bool:
        """Whether the session is encrypted (implicit TLS or STARTTLS)."""
        return self.security != "none"

    def redacted_url(self) -> str:
        """The profile as a URL with the password replaced, for logs and errors.

        Options that differ from their defaults are kept, so the URL (given the
        password) reads back as this profile; the ``oauth*`` options are not (they
        built a token provider, which cannot be written back).
        """
        scheme = {"tls": "smtps", "starttls": "smtp+starttls", "none": "smtp"}[self.security]
        user = f"{quote(self.username, safe='')}:****@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = urlencode(self._options(), safe="/,:", quote_via=quote)
        return f"{scheme}://{user}{host}:{self.port}" + (f"?{query}" if query else "")

    def _options(self) -> list[tuple[str, str]]:
        """The URL options that differ from the defaults (``oauth*`` left out)."""
        default = Profile(host="localhost", port=25)
        out: list[tuple[str, str]] = []
        plain = ("verify", "allow_insecure_auth", "max_messages", "noop_after")
        for option in plain:
            value = getattr(self, option)
            if value != getattr(default, option):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                out.append((option, _number(value) if isinstance(value, float) else text))
        if self.auth != AUTH_MECHANISMS:
            out.append(("auth", ",".join(self.auth)))
        stages = {getattr(self.timeouts, f.name) for f in dataclasses.fields(Timeouts)}
        if self.timeouts != Timeouts() and len(stages) == 1:
            out.append(("timeout", _number(stages.pop())))
        for option in (
            "ca_file",
            "client_cert",
            "client_key",
            "local_hostname",
            "dkim_domain",
            "dkim_selector",
            "dkim_key_file",
        ):
            if getattr(self, option) is not None:
                out.append((option, str(getattr(self, option))))
        return out + self.fleet.options()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        name: str = "default",
        password: str | None = None,
        oauth_token_provider: TokenProvider | None = None,
    ) -> Profile:
        """Parse a profile URL.

        Args:
            url: e.g. ``smtps://user:pass@smtp.example.com:465?timeout=30``.
                User and password are percent-decoded.
            name: the profile's name, used in messages.
            password: used when the URL has none (from a secret store).
            oauth_token_provider: returns an OAuth2 bearer token for XOAUTH2; the URL's
                ``oauth*`` options build one instead (:mod:`mailworker.smtp.oauth`).

        Raises:
            ConfigError: the URL or an option is malformed; the message names it and
                never contains the password.
        """
        where = f"profile {name!r}"
        if "\r" in url or "\n" in url or " " in url.strip():
            raise ConfigError(f"{where}: the SMTP URL must not contain spaces, CR or LF")
        try:
            parts = urlsplit(url.strip())
            hostname = parts.hostname
        except ValueError as exc:
            # Never quote exc: urllib's NFKC check quotes the whole netloc, password too.
            raise ConfigError(
                f"{where}: the SMTP URL is malformed ({_split_problem(exc)})"
            ) from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{where}: unknown URL scheme {parts.scheme!r}; use one of "
                + ", ".join(f"{s}://" for s in SCHEMES)
            )
        security, default_port = SCHEMES[scheme]
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"{where}: the port in the SMTP URL is not a number") from None
        if not hostname:
            raise ConfigError(f"{where}: the SMTP URL has no host (e.g. smtps://smtp.example.com)")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"{where}: the SMTP URL must not have a path or fragment")
        url_password = unquote(parts.password) if parts.password is not None else None
        if url_password is not None and password is not None:
            raise ConfigError(
                f"{where}: password given twice (in the URL and in the environment); keep one"
            )
        kwargs = _parse_options(parts.query, where)
        timeout = kwargs.pop("timeout", None)
        if timeout is not None:
            kwargs["timeouts"] = Timeouts.uniform(float(timeout))  # type: ignore[arg-type]
        fleet = {k: kwargs.pop(k) for k in _FLEET_OPTIONS if k in kwargs}
        if fleet:
            try:
                kwargs["fleet"] = FleetLimits(**fleet)  # type: ignore[arg-type]
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        oauth_options = {k: str(kwargs.pop(k)) for k in _oauth_options.OPTIONS if k in kwargs}
        if oauth_options:
            if oauth_token_provider is not None:
                raise ConfigError(
                    f"{where}: OAuth token given twice (the URL's oauth options and "
                    "MAILWORKER_SMTP_OAUTH_TOKEN or the caller); keep one"
                )
            try:
                oauth_token_provider = _oauth_options.provider_from_options(oauth_options)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return cls(
            host=hostname,
            port=port,
            security=security,
            username=unquote(parts.username) if parts.username else None,
            password=url_password if url_password is not None else password,
            oauth_token_provider=oauth_token_provider,
            name=name,
            **kwargs,  # type: ignore[arg-type]
        )

    @classmethod
    def from_env(cls, name: str = "default", environ: Mapping[str, str] | None = None) -> Profile:
        """Read profile ``name`` from ``MAILWORKER_SMTP_URL[_<NAME>]`` and friends.

        ``name`` is case-insensitive (see :func:`normalize_profile_name`).

        Raises:
            ConfigError: the variable is missing or malformed (the message names it).
        """
        env = os.environ if environ is None else environ
        name = normalize_profile_name(name)
        suffix = _suffix(name)
        var = f"MAILWORKER_SMTP_URL{suffix}"
        url = env.get(var)
        if not url:
            raise ConfigError(
                f"profile {name!r}: set {var} (e.g. smtps://user:password@smtp.example.com)"
            )
        for secret in ("PASSWORD", "OAUTH_TOKEN"):
            _refuse_misplaced_file(env, secret, suffix)
        password = _secret(env, f"MAILWORKER_SMTP_PASSWORD{suffix}")
        token_var = f"MAILWORKER_SMTP_OAUTH_TOKEN{suffix}"
        provider = _token_provider(env, token_var)
        try:
            return cls.from_url(url, name=name, password=password, oauth_token_provider=provider)
        except ConfigError as exc:
            raise ConfigError(f"{var}: {exc}") from None


def profile_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The names of every profile configured in the environment (normalised)."""
    env = os.environ if environ is None else environ
    names = set()
    for key in env:
        if key == "MAILWORKER_SMTP_URL":
            names.add("default")
        elif key.startswith("MAILWORKER_SMTP_URL_"):
            names.add(normalize_profile_name(key.removeprefix("MAILWORKER_SMTP_URL_")))
    return sorted(names)


def _suffix(name: str) -> str:
    """The environment variables' suffix for profile ``name``: none for ``default``."""
    return "" if name == "default" else "_" + name.upper()


def _split_problem(exc: ValueError) -> str:
    """What urllib found wrong with a URL, without quoting the URL (it may hold a password)."""
    text = str(exc)
    if "NFKC" in text:
        return (
            "the user name, password or host contains a character that Unicode (NFKC) "
            "normalisation turns into a URL delimiter, such as U+FF03 (fullwidth #); "
            "percent-encode the user name and password"
        )
    if "IPv6" in text:
        return "unbalanced [ ] around an IPv6 address"
    return "it cannot be split into scheme, host and options"


def _refuse_misplaced_file(env: Mapping[str, str], secret: str, suffix: str) -> None:
    """``MAILWORKER_SMTP_<SECRET>_FILE_<NAME>`` is read by nothing: say which name is."""
    if not suffix:
        return
    wrong = f"MAILWORKER_SMTP_{secret}_FILE{suffix}"
    # ...unless it is the plain secret of a profile named FILE_<NAME>.
    if env.get(wrong) and f"MAILWORKER_SMTP_URL_FILE{suffix}" not in env:
        raise ConfigError(
            f"{wrong} is not read: a secret file's variable is the secret's variable with "
            f"_FILE appended; rename it to MAILWORKER_SMTP_{secret}{suffix}_FILE"
        )


_OPTIONS: dict[str, Callable[[str, str], object]] = {}


def _option(name: str) -> Callable[[Callable[[str, str], object]], Callable[[str, str], object]]:
    def register(parse: Callable[[str, str], object]) -> Callable[[str, str], object]:
        _OPTIONS[name] = parse
        return parse

    return register


def _parse_bool(key: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"option {key}={value!r}: expected true or false")


def _parse_number(key: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"option {key}={value!r}: expected a number") from None
    if number <= 0 and key != "noop_after":
        raise ConfigError(f"option {key}={value!r}: must be positive")
    return number


def _parse_path(key: str, value: str) -> str:
    if not Path(value).is_file():
        raise ConfigError(f"option {key}={value!r}: no such file")
    return value


for _name in ("verify", "allow_insecure_auth"):
    _option(_name)(_parse_bool)
for _name in ("ca_file", "client_cert", "client_key"):
    _option(_name)(_parse_path)
_option("timeout")(lambda k, v: _parse_number(k, v, float))
_option("noop_after")(lambda k, v: _parse_number(k, v, float))
_option("max_messages")(lambda k, v: int(_parse_number(k, v, int)))
_option("local_hostname")(lambda _k, v: v)


# dkim_domain and dkim_selector are checked by Profile. The key file is not opened here:
# only the worker needs it, and reads and checks it when it starts.
for _name in ("dkim_domain", "dkim_selector", "dkim_key_file"):
    _option(_name)(lambda _k, v: v)


@_option("auth")
def _parse_auth(key: str, value: str) -> tuple[str, ...]:
    mechs = tuple(m.strip().upper() for m in value.split(",") if m.strip())
    unknown = [m for m in mechs if m not in AUTH_MECHANISMS]
    if unknown or not mechs:
        raise ConfigError(
            f"option {key}={value!r}: choose an ordered list from {','.join(AUTH_MECHANISMS)}"
        )
    return mechs


# The fleet limits' options; from_url puts them together in a FleetLimits.
_FLEET_OPTIONS = tuple(f.name for f in dataclasses.fields(FleetLimits))


@_option("rate")
def _parse_rate(key: str, value: str) -> Rate:
    return Rate.parse(value, f"option {key}")


@_option("fallback")
def _parse_fallback(key: str, value: str) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise ConfigError(
            f"option {key}={value!r}: give profile names separated by commas, e.g. "
            "fallback=backup or fallback=backup,relay"
        )
    return tuple(normalize_profile_name(n) for n in names)


def _parse_whole(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"option {key}={value!r}: expected a whole number, e.g. 5") from None
    if number < 1:
        raise ConfigError(f"option {key}={value!r}: must be at least 1")
    return number


def _parse_seconds(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"option {key}={value!r}: expected a positive number of seconds")
    return number


for _name in ("max_connections", "breaker_failures"):
    _option(_name)(_parse_whole)
for _name in ("breaker_window", "breaker_reset", "throttle_backoff", "throttle_backoff_max"):
    _option(_name)(_parse_seconds)


# The oauth* options describe a token provider together; from_url builds it.
for _name in _oauth_options.OPTIONS:
    _option(_name)(_oauth_options.parse_option)


def _parse_options(query: str, where: str) -> dict[str, object]:
    options: dict[str, object] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(
            f"{where}: the URL query is malformed; use ?key=value&key=value"
        ) from None
    for key, value in pairs:
        parse = _OPTIONS.get(key)
        if parse is None:
            raise ConfigError(
                f"{where}: unknown option {key!r}; known options: {', '.join(sorted(_OPTIONS))}"
            )
        if key in options:
            raise ConfigError(f"{where}: option {key!r} given twice")
        try:
            options[key] = parse(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return options


def _secret(env: Mapping[str, str], var: str) -> str | None:
    """A secret from ``VAR`` or the file named by ``VAR_FILE`` (one trailing newline
    stripped, as secret files usually end with one)."""
    value = env.get(var)
    path = env.get(f"{var}_FILE")
    if value and path:
        raise ConfigError(f"set either {var} or {var}_FILE, not both")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise ConfigError(f"{var}_FILE: cannot read {path!r}: {exc.strerror}") from None
    return value or None


def _token_provider(env: Mapping[str, str], var: str) -> TokenProvider | None:
    # A token file is re-read at every connect, so an outside process can refresh it.
    path = env.get(f"{var}_FILE")
    if path:
        _secret(env, var)  # fail now, not at the first send, if it cannot be read
        return oauth.TokenFile(path)
    token = _secret(env, var)
    if token:
        return oauth.StaticToken(token)
    return None

"""Email addresses in payloads: parsing, validation and IDNA domains.

A payload address is ``a@b.example`` or ``Display Name <a@b.example>``; it is checked here
and returned as an :class:`email.headerregistry.Address`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from email.headerregistry import Address
from typing import Final

import idna

from mailworker.message._fields import fail, header_text, type_name

_ATEXT: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_QUOTED_PAIR = re.compile(r"\\(.)")


def to_ascii_domain(domain: str) -> str:
    """The domain in ASCII (IDNA A-labels, or the address literal); ValueError if invalid."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise ValueError(f"domain literal {domain!r} is not an IP address") from None
        return domain
    ascii_domain = domain
    if not domain.isascii():
        try:
            # IDNA 2008 with UTS #46 mapping, non-transitional: the stdlib's IDNA 2003
            # codec maps 'straße.de' to 'strasse.de', which is another domain.
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ValueError(f"domain {domain!r} is not a valid domain name") from None
    if len(ascii_domain) > 255:
        raise ValueError("domain is longer than 255 octets")
    if not all(_LDH_LABEL.fullmatch(label) for label in ascii_domain.split(".")):
        raise ValueError(f"domain {domain!r} is not a valid domain name")
    return ascii_domain


def _split_addr_spec(spec: str) -> tuple[str, str]:
    """Check a bare address; return (local part, domain) or raise ValueError(reason)."""
    if any(ch.isspace() for ch in spec):
        raise ValueError("contains whitespace")
    if spec.count("@") != 1:
        raise ValueError("expected exactly one '@'")
    local, _, domain = spec.partition("@")
    if not local or not domain:
        raise ValueError("empty local part" if not local else "empty domain")
    if len(local.encode()) > 64:
        raise ValueError("local part is longer than 64 octets")
    atoms_ok = all(
        atom and all(ch in _ATEXT or (ord(ch) > 127 and ch.isprintable()) for ch in atom)
        for atom in local.split(".")
    )
    if not atoms_ok:
        raise ValueError("the part before '@' has a character or dot that needs quoting")
    ascii_domain = to_ascii_domain(domain)
    # An ASCII local part means no SMTPUTF8 is needed: write the domain in A-labels so
    # every server can take it. A non-ASCII local part needs SMTPUTF8 anyway, which
    # carries U-labels as they are.
    if local.isascii():
        domain = ascii_domain
    if len(f"{local}@{domain}".encode()) > 254:
        raise ValueError("longer than 254 octets")
    return local, domain


def parse_address(name: str, value: object) -> Address:
    """Parse 'a@b.example' or 'Display Name <a@b.example>' into a checked Address."""
    if not isinstance(value, str):
        fail(name, f"must be an email address string, got {type_name(value)}")
    return _parse(name, value)


# A message's addresses are checked where they are given, for the envelope and for each
# header that names them: the same few strings several times. Address is immutable;
# a refusal is raised again each time (lru_cache keeps only results).
@functools.lru_cache(maxsize=1024)
def _parse(name: str, value: str) -> Address:
    text = header_text(name, value).strip()
    display, spec = "", text
    if text.endswith(">") and "<" in text:
        cut = text.rindex("<")
        display, spec = text[:cut].strip(), text[cut + 1 : -1].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = _QUOTED_PAIR.sub(r"\1", display[1:-1])
    try:
        local, domain = _split_addr_spec(spec)
    except ValueError as exc:
        hint = "pass several addresses as a list" if "," in spec else str(exc)
        fail(name, f"{value!r} is not a valid email address ({hint})")
    return Address(display_name=display, username=local, domain=domain)


def address_list(name: str, value: object) -> tuple[Address, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (parse_address(name, value),)
    if not isinstance(value, (list, tuple)):
        fail(name, f"must be an email address or a list of them, got {type_name(value)}")
    return tuple(parse_address(f"{name}[{i}]", item) for i, item in enumerate(value))


def unique_addr_specs(addresses: Iterable[Address]) -> tuple[str, ...]:
    """Bare addresses, first occurrence kept; domains compare case-insensitively, local
    parts exactly (RFC 5321 lets the receiving server treat case in them as significant)."""
    seen: set[tuple[str, str]] = set()
    unique: list[str] = []
    for address in addresses:
        key = (address.username, address.domain.lower())
        if key not in seen:
            seen.add(key)
            unique.append(address.addr_spec)
    return tuple(unique)

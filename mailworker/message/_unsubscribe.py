"""List-Unsubscribe (RFC 2369) and one-click unsubscribe (RFC 8058).

``send_mail(list_unsubscribe=..., list_unsubscribe_post=True)`` writes::

    List-Unsubscribe: <https://example.com/unsub?u=42>, <mailto:unsub@example.com>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

Only ``https:`` and ``mailto:`` URIs are taken: RFC 8058 wants https for the one-click
POST, and a plain ``http:`` link would send the recipient's token in clear text. A URI is
written as given between angle brackets, so it must be a URI already: printable ASCII of
RFC 3986's characters (no space, quote, ``<`` or ``>``; percent-encode anything else) and
no RFC 2047 encoded-word (``=?utf-8?q?...?=``), which mail readers would decode.

The same fields given in ``headers`` pass the same checks and are written the same way
(``<uri>, <uri>``); giving one both ways is refused.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from mailworker.message._fields import fail, header_text, type_name

__all__ = [
    "LIST_UNSUBSCRIBE",
    "LIST_UNSUBSCRIBE_POST",
    "ONE_CLICK",
    "check_one_click",
    "check_post",
    "check_unsubscribe",
    "check_uris",
    "parse_list_unsubscribe",
    "unsubscribe_value",
]

LIST_UNSUBSCRIBE: Final = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST: Final = "List-Unsubscribe-Post"
#: The one value RFC 8058 §3.1 allows in List-Unsubscribe-Post.
ONE_CLICK: Final = "List-Unsubscribe=One-Click"
#: Longest URI: with the field name and brackets it stays within a 998-octet line.
MAX_URI: Final = 900
_SCHEMES: Final = ("https", "mailto")
# RFC 3986 unreserved, reserved and '%': what a URI is made of.
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
# An RFC 2047 encoded-word anywhere, as the email package's header parser finds them.
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?[^?]*\?=")
# The field's value: angle-bracketed URIs separated by commas.
_BRACKETED_LIST = re.compile(r"\s*<[^<>]*>\s*(?:,\s*<[^<>]*>\s*)*")


def check_uri(where: str, value: object) -> str:
    """One unsubscribe URI (bare, without ``<>``): https with a host, or mailto with an
    address. Returned as given."""
    if not isinstance(value, str):
        fail(where, f"must be a URI string, got {type_name(value)}")
    uri = header_text(where, value)  # CR, LF and other control characters
    if not uri:
        fail(where, "must not be empty")
    if len(uri) > MAX_URI:
        fail(where, f"at most {MAX_URI} characters")
    if not uri.isascii():
        fail(where, "non-ASCII characters must be percent-encoded (RFC 3986)")
    bad = _URI_CHARS.sub("", uri)
    if bad:
        if bad[0] in "<>":
            fail(where, "give the bare URI, without <>")
        fail(where, f"{bad[0]!r} is not allowed in a URI; percent-encode it")
    if _ENCODED_WORD.search(uri):
        fail(where, "contains an RFC 2047 encoded-word (=?...?=); percent-encode the '='")
    scheme, _, rest = uri.partition(":")
    if scheme.lower() not in _SCHEMES:
        hint = " (use https)" if scheme.lower() == "http" else ""
        fail(where, f"only https: and mailto: URIs are allowed, not {scheme + ':'!r}{hint}")
    if scheme.lower() == "https" and not urlsplit(uri).hostname:
        fail(where, "an https: URI needs a host (https://example.com/...)")
    if scheme.lower() == "mailto" and "@" not in rest.partition("?")[0]:
        fail(where, "a mailto: URI needs an address (mailto:unsubscribe@example.com)")
    return uri


def check_uris(where: str, value: object) -> tuple[str, ...]:
    """The ``list_unsubscribe`` argument: a URI or a list of them (None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (check_uri(where, value),)
    if not isinstance(value, (list, tuple)):
        fail(where, f"must be a URI or a list of URIs, got {type_name(value)}")
    return tuple(check_uri(f"{where}[{i}]", item) for i, item in enumerate(value))


def parse_list_unsubscribe(where: str, text: str) -> tuple[str, ...]:
    """The URIs of a List-Unsubscribe value given in ``headers`` (``<uri>, <uri>``)."""
    if not _BRACKETED_LIST.fullmatch(text):
        fail(where, "must be <uri> or <uri>, <uri> (https: or mailto:)")
    found = re.findall(r"<([^<>]*)>", text)
    return tuple(check_uri(where, uri) for uri in found)


def unsubscribe_value(uris: tuple[str, ...]) -> str:
    """The List-Unsubscribe value: each URI in angle brackets, comma-separated."""
    return ", ".join(f"<{uri}>" for uri in uris)


def check_one_click(where: str, text: str) -> str:
    """A List-Unsubscribe-Post value given in ``headers``: only RFC 8058's."""
    if text.strip() != ONE_CLICK:
        fail(where, f"must be {ONE_CLICK!r} (RFC 8058); or pass list_unsubscribe_post=True")
    return ONE_CLICK


def check_post(value: object) -> bool:
    """The ``list_unsubscribe_post`` argument: true or false (None: false)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        fail("list_unsubscribe_post", f"must be true or false, got {type_name(value)}")
    return value


def check_unsubscribe(
    uris: tuple[str, ...], post: bool, headers: tuple[tuple[str, str], ...]
) -> None:
    """Check the arguments against each other and against ``headers`` (each already
    checked on its own).

    One-click (RFC 8058 §3.1) needs an https URI to POST to; a field given both as an
    argument and in ``headers`` is refused.
    """
    given = {name.lower(): value for name, value in headers}
    header_uris = given.get(LIST_UNSUBSCRIBE.lower())
    if uris and header_uris is not None:
        fail(f"headers[{LIST_UNSUBSCRIBE!r}]", "also given as list_unsubscribe; pass it once")
    if post and LIST_UNSUBSCRIBE_POST.lower() in given:
        fail(
            f"headers[{LIST_UNSUBSCRIBE_POST!r}]",
            "also given as list_unsubscribe_post; pass it once",
        )
    if header_uris is not None:
        uris = parse_list_unsubscribe(f"headers[{LIST_UNSUBSCRIBE!r}]", header_uris)
    if post or LIST_UNSUBSCRIBE_POST.lower() in given:
        where = "list_unsubscribe_post" if post else f"headers[{LIST_UNSUBSCRIBE_POST!r}]"
        if not any(uri.lower().startswith("https:") for uri in uris):
            fail(where, "one-click unsubscribe (RFC 8058) needs an https: URI in list_unsubscribe")

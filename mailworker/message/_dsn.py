"""The ``dsn`` task option: delivery status notifications (RFC 3461) to ask for.

``{"notify": ["FAILURE", "DELAY"], "ret": "HDRS", "envid": "order-42"}``, every key
optional. It steers the envelope, not the message, so the payloads do not keep it: the
worker turns it into a :class:`mailworker.smtp.DSN` (whose rules these are, repeated here
because this layer knows no SMTP code and a web process checks before it publishes).
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, cast

from mailworker.message._fields import check_fields, fail, type_name

__all__ = ["DSNOptions", "check_dsn"]

_NOTIFY: Final = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
_RET: Final = ("FULL", "HDRS")
#: RFC 3461 §4.4: ENVID is at most 100 characters, checked in its xtext form.
_MAX_ENVID: Final = 100


class DSNOptions(NamedTuple):
    """A checked ``dsn`` option, values in upper case."""

    notify: tuple[Literal["NEVER", "SUCCESS", "FAILURE", "DELAY"], ...]
    ret: Literal["FULL", "HDRS"] | None
    envid: str | None


def _xtext_length(text: str) -> int:
    # xtext: printable ASCII but '+' and '=' as it is, everything else as "+XX".
    return sum(1 if 33 <= ord(c) <= 126 and c not in "+=" else 3 for c in text)


def _notify(where: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        fail(where, f"must be a list such as ['FAILURE', 'DELAY'], got {type_name(value)}")
    if not items:
        fail(where, "must not be empty: leave it out for the server's default, or ['NEVER']")
    found: list[str] = []
    for item in items:
        if not isinstance(item, str) or item.strip().upper() not in _NOTIFY:
            fail(where, f"{item!r} is not one of {', '.join(_NOTIFY)}")
        if item.strip().upper() not in found:
            found.append(item.strip().upper())
    if "NEVER" in found and len(found) > 1:
        fail(where, "NEVER cannot be combined with SUCCESS, FAILURE or DELAY")
    return tuple(found)


def check_dsn(name: str, value: object) -> DSNOptions | None:
    """The ``dsn`` option checked and normalised (None when not given).

    Raises:
        InvalidMessageError: naming ``dsn.notify``, ``dsn.ret``, ``dsn.envid`` or an
            unknown key ("did you mean").
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        fail(name, f"must be an object with notify, ret and envid, got {type_name(value)}")
    check_fields(value, ("notify", "ret", "envid"), prefix=f"{name}.")
    notify = _notify(f"{name}.notify", value.get("notify"))
    ret = value.get("ret")
    if ret is not None and (not isinstance(ret, str) or ret.upper() not in _RET):
        fail(f"{name}.ret", f"must be FULL or HDRS, not {ret!r}")
    envid = value.get("envid")
    if envid is not None:
        where = f"{name}.envid"
        if not isinstance(envid, str) or not envid:
            fail(where, "must be a non-empty string")
        if any(not 32 <= ord(c) <= 126 for c in envid):
            fail(where, "printable ASCII only (RFC 3461 §4.4)")
        if _xtext_length(envid) > _MAX_ENVID:
            fail(where, f"at most {_MAX_ENVID} characters once xtext-encoded (RFC 3461 §4.4)")
    return DSNOptions(
        notify=cast("tuple[Literal['NEVER', 'SUCCESS', 'FAILURE', 'DELAY'], ...]", notify),
        ret=cast("Literal['FULL', 'HDRS'] | None", ret.upper() if ret is not None else None),
        envid=envid,
    )

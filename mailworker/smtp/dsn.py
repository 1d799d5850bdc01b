"""Delivery status notifications (DSN, RFC 3461): what to ask the server for.

A :class:`DSN` given to :meth:`~mailworker.smtp.SMTPSession.send` adds ``RET=`` and
``ENVID=`` to MAIL FROM and ``NOTIFY=`` and ``ORCPT=`` to every RCPT TO — when the server
offers DSN in its EHLO reply. A server that does not would refuse the parameters, so the
message then goes without them and :attr:`SendResult.dsn` says ``"not_offered"``.

ENVID and ORCPT values are xtext (RFC 3461 §4): ``+XX`` for every character outside
33..126 and for ``+`` and ``=``, so nothing in them can end the parameter or the line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["DSN", "DSNNotify", "DSNRet", "DSNStatus", "xtext"]

#: A NOTIFY value: NEVER alone, or any of SUCCESS, FAILURE and DELAY.
DSNNotify = Literal["NEVER", "SUCCESS", "FAILURE", "DELAY"]
#: A RET value: the whole message (FULL) or its headers only (HDRS) in a bounce.
DSNRet = Literal["FULL", "HDRS"]
#: What became of a request for DSN: sent with the parameters, or without them because
#: the server does not offer DSN.
DSNStatus = Literal["requested", "not_offered"]

_NOTIFY: Final = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
_RET: Final = ("FULL", "HDRS")
#: RFC 3461 §4.4: the ENVID parameter is at most 100 characters (checked once encoded).
MAX_ENVID: Final = 100


def xtext(text: str) -> str:
    """``text`` as RFC 3461 xtext: printable ASCII but ``+`` and ``=`` as is, every other
    character (and every byte of a non-ASCII one) as ``+XX``."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in b"+=" else f"+{b:02X}" for b in text.encode()
    )


@dataclass(frozen=True)
class DSN:
    """Delivery status notifications to ask the server for (RFC 3461).

    Example::

        session.send(sender, recipients, data,
                     dsn=DSN(notify=("FAILURE", "DELAY"), ret="HDRS", envid="order-42"))

    Attributes:
        notify: when to notify the sender, per recipient: ``("NEVER",)``, or any of
            ``SUCCESS``, ``FAILURE``, ``DELAY``; empty leaves it to the server (which
            usually means FAILURE and DELAY).
        ret: ``"FULL"`` (the whole message) or ``"HDRS"`` (its headers) in a bounce;
            None leaves it to the server.
        envid: an envelope id of printable ASCII, returned in every notification;
            at most 100 characters once xtext-encoded.

    Raises:
        ValueError: a value is not one of the above; the message names the field.
    """

    notify: tuple[DSNNotify, ...] = ()
    ret: DSNRet | None = None
    envid: str | None = None

    def __post_init__(self) -> None:
        # Checked as objects: a caller without a type checker may pass a list, or anything.
        given: object = self.notify
        if isinstance(given, str) or not isinstance(given, Iterable):
            raise ValueError(f"dsn.notify: a tuple of {', '.join(_NOTIFY)}, not {given!r}")
        notify = tuple(given)
        object.__setattr__(self, "notify", notify)
        unknown = [n for n in notify if n not in _NOTIFY]
        if unknown:
            raise ValueError(f"dsn.notify: {unknown[0]!r} is not one of {', '.join(_NOTIFY)}")
        if len(set(notify)) != len(notify):
            raise ValueError("dsn.notify: a value is given twice")
        if "NEVER" in notify and len(notify) > 1:
            raise ValueError("dsn.notify: NEVER cannot be combined with another value")
        if self.ret is not None and self.ret not in _RET:
            raise ValueError(f"dsn.ret: {self.ret!r} is not FULL or HDRS")
        envid: object = self.envid
        if envid is not None:
            if not isinstance(envid, str) or not envid:
                raise ValueError("dsn.envid: a non-empty string")
            if any(not 32 <= ord(c) <= 126 for c in envid):
                raise ValueError("dsn.envid: printable ASCII only (RFC 3461 §4.4)")
            if len(xtext(envid)) > MAX_ENVID:
                raise ValueError(f"dsn.envid: at most {MAX_ENVID} characters once xtext-encoded")

    def mail_params(self) -> list[str]:
        """The MAIL FROM parameters: ``RET=`` and ``ENVID=`` where given."""
        params = []
        if self.ret is not None:
            params.append(f"RET={self.ret}")
        if self.envid is not None:
            params.append(f"ENVID={xtext(self.envid)}")
        return params

    def rcpt_params(self, address: str) -> list[str]:
        """The RCPT TO parameters for ``address``: ``NOTIFY=`` where given, and
        ``ORCPT=rfc822;`` with the address, so a notification names it as we sent it.

        ORCPT is left out for a non-ASCII address, which the ``rfc822`` type cannot
        carry (RFC 6533's ``utf-8`` type is not used).
        """
        params = []
        if self.notify:
            params.append("NOTIFY=" + ",".join(self.notify))
        if address and address.isascii():
            params.append(f"ORCPT=rfc822;{xtext(address)}")
        return params

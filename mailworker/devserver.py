"""A development SMTP server, like MailHog or Mailpit: every message lands in a maildir.

Point an application (or ``mailworker worker``) at it instead of a real provider::

    with DevServer("mail", port=0, tls="starttls", auth=("dev", "secret")) as server:
        print(server.url())            # smtp+starttls://dev:secret@localhost:PORT?ca_file=...
        ...
        print(server.counters.summary())

It speaks real SMTP (aiosmtpd) with real TLS: at start it makes a throw-away CA and a
certificate for its host name (trustme) and writes the CA certificate next to the maildir,
so clients verify it with ``?ca_file=``. It can refuse recipients by ``fnmatch`` pattern,
for good (550 5.1.1), for now (451 4.2.0), or only the first time an address is tried.

Needs the ``devserver`` extra (aiosmtpd and trustme); importing this module without it
raises :class:`ImportError` whose message says what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import hmac
import mailbox
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

#: The command that installs what this module needs.
INSTALL_HINT = 'pip install "mailworker[devserver]"'

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ImportError as exc:  # pragma: no cover - exercised with the extra removed
    raise ImportError(
        f"the development SMTP server needs aiosmtpd and trustme: {INSTALL_HINT}",
        name=exc.name,
    ) from exc

__all__ = ["INSTALL_HINT", "Counters", "DevServer", "TLSMode"]

#: ``none``: clear text; ``starttls``: STARTTLS offered; ``implicit``: TLS from the first byte.
TLSMode = Literal["none", "starttls", "implicit"]
TLS_MODES: tuple[TLSMode, ...] = ("none", "starttls", "implicit")

#: Replies to refused recipients (RFC 3463 codes).
REJECT_REPLY = "550 5.1.1 <{}>: Recipient address rejected (devserver --reject)"
DEFER_REPLY = "451 4.2.0 <{}>: Try again later (devserver --defer)"


@dataclass_frozen := dataclasses.dataclass(frozen=True)  # noqa: E999 - placeholder, replaced below
class _Unused:  # pragma: no cover
    pass

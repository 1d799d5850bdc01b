"""Constants and small helpers shared by the SMTP session tests."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence

from mailworker import Profile
from tests.servers import SERVER_HOSTNAME, Script, ScriptConnection

#: The type of the ``make_profile`` fixture (see conftest.py).
ProfileFactory = Callable[..., Profile]

#: Envelope sender used throughout.
SENDER = "app@example.com"
#: A recipient every server accepts.
RCPT = "ann@example.org"
#: Text that only appears in the message body (to prove content stays out of transcripts).
BODY_MARKER = b"Secret-ish body text 7f3a"
#: A small, ASCII, CRLF message.
MESSAGE = (
    b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: hello\r\n\r\n"
    + BODY_MARKER
    + b"\r\n"
)


def wire_form(body: bytes) -> bytes:
    """What a correct client delivers for ``body``: CRLF line endings only, ending in CRLF.

    Written independently of mailworker.smtp.body so the test does not trust the code under test.
    """
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i : i + 2] == b"\r\n":
            out += b"\r\n"
            i += 2
        elif body[i : i + 1] in (b"\r", b"\n"):
            out += b"\r\n"
            i += 1
        else:
            out += body[i : i + 1]
            i += 1
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return bytes(out)


def b64(text: str | bytes) -> str:
    """Base64 of ``text`` (UTF-8), as it would appear on the wire."""
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def verb(line: str) -> str:
    """The command word of a client line (``"MAIL FROM:<a>"`` -> ``"MAIL"``)."""
    return re.split(r"[\s:]", line, maxsplit=1)[0].upper()


def smtp_script(
    replies: Mapping[str, str] | None = None,
    *,
    extensions: Sequence[str] = ("8BITMIME",),
    greeting: str | None = f"220 {SERVER_HOSTNAME} ESMTP scripted",
    on_line: Callable[[ScriptConnection, str], None] | None = None,
) -> Script:
    """A minimal lock-step SMTP server for a :class:`ScriptedServer`.

    ``replies`` maps a command word (``MAIL``, ``RCPT``, ``DATA``, ``RSET``, ...) or
    ``END`` (the end of the data) to the reply to send; multi-line replies are written
    with ``\\r\\n`` between lines. Anything not listed gets an ordinary success reply.
    ``greeting=None`` skips the greeting (to continue a conversation after STARTTLS);
    ``on_line(conn, line)`` is called with each client line before it is answered.
    """
    table = dict(replies or {})

    def script(conn: ScriptConnection) -> None:
        if greeting is not None:
            conn.send(greeting)
        while True:
            line = conn.readline()
            if on_line is not None:
                on_line(conn, line)
            word = verb(line)
            if word in ("EHLO", "HELO") and word not in table:
                conn.send_reply("250", [SERVER_HOSTNAME, *(extensions if word == "EHLO" else ())])
            elif word == "QUIT":
                conn.send(table.get("QUIT", "221 bye"))
                return
            elif word == "DATA":
                reply = table.get("DATA", "354 go ahead")
                conn.send(reply)
                if reply.rsplit("\r\n", 1)[-1].startswith("354"):
                    conn.read_until_data_end()
                    conn.send(table.get("END", "250 OK: queued as SCRIPTED1"))
            else:
                conn.send(table.get(word, "250 OK"))

    return script

"""Building the MIME message for a :class:`~mailworker.message.MailPayload`, and its bytes."""

from __future__ import annotations

import re
from datetime import datetime
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING, Final

from mailworker.message import _registry
from mailworker.message._address import parse_address, to_ascii_domain
from mailworker.message._attachments import Attachment
from mailworker.message._fields import fail
from mailworker.message._unsubscribe import (
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    ONE_CLICK,
    unsubscribe_value,
)
from mailworker.message._wire import VerbatimHeader, disposition, header_mismatch

if TYPE_CHECKING:
    from mailworker.message.payload import MailPayload

# The payload field a header field comes from, to name it in an error.
_FIELDS: Final = {
    "from": "from_email",
    "to": "to",
    "cc": "cc",
    "reply-to": "reply_to",
    "subject": "subject",
    "list-unsubscribe": "list_unsubscribe",
    "list-unsubscribe-post": "list_unsubscribe_post",
}
#: Fields whose value is URIs, written literally: never as encoded-words, which would
#: turn an ``=?`` in a URI into something no client can follow.
_LITERAL: Final = frozenset({LIST_UNSUBSCRIBE.lower(), LIST_UNSUBSCRIBE_POST.lower()})
# Control characters other than TAB/CR/LF; a body holding them is sent quoted-printable so
# the wire carries none of them.
_BODY_CONTROL = re.compile("[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")
# The SMTP policies default to cte_type="8bit", which sends short non-ASCII text as raw 8-bit
# and so would need 8BITMIME; "7bit" makes the email package pick quoted-printable or base64.
_POLICY: Final = _registry.SMTP.clone(cte_type="7bit")
_POLICY_UTF8: Final = _registry.SMTPUTF8.clone(cte_type="7bit")


def _set_body(part: EmailMessage, content: str, subtype: str) -> None:
    # Left to itself the email package picks 7bit for short ASCII lines and otherwise the
    # shorter of quoted-printable and base64; control characters are forced into
    # quoted-printable so that no byte on the wire needs explaining.
    cte = "quoted-printable" if _BODY_CONTROL.search(content) else None
    part.set_content(content, subtype=subtype, charset="utf-8", cte=cte)


def _new_part(policy: Policy) -> EmailMessage:
    # EmailMessage rather than MIMEPart because attach() wants the parent's own type, as
    # the email package's add_attachment() does; build_message strips the MIME-Version
    # that EmailMessage.set_content() adds, as it belongs at the top level only.
    return EmailMessage(policy=policy)


def _file_part(attachment: Attachment, policy: Policy) -> EmailMessage:
    part = _new_part(policy)
    maintype, _, subtype = (attachment.mimetype or "application/octet-stream").partition("/")
    inline = attachment.content_id is not None
    part.set_content(attachment.content, maintype=maintype, subtype=subtype)
    # Written by us, not the email package, which decodes encoded-words in parameters.
    kind = "inline" if inline else "attachment"
    part["Content-Disposition"] = disposition(kind, attachment.filename)
    if inline:
        part["Content-ID"] = VerbatimHeader("Content-ID", f"<{attachment.content_id}>")
    return part


def _fill_html(part: EmailMessage, html: str, inline: list[Attachment], policy: Policy) -> None:
    _set_body(part, html, "html")
    if inline:
        part.make_related()
        for attachment in inline:
            part.attach(_file_part(attachment, policy))


def build_message(payload: MailPayload, *, message_id_domain: str | None = None) -> EmailMessage:
    """Build the MIME message for a validated payload.

    Structure: a single text/plain or text/html part; text with html as
    multipart/alternative; inline parts in multipart/related around the HTML; with other
    attachments, multipart/mixed outermost. Bcc never appears in the headers.

    Args:
        payload: The validated payload.
        message_id_domain: Domain for a generated Message-ID; defaults to the sender's.

    Returns:
        The message, with policy :data:`email.policy.SMTP` (or
        :data:`email.policy.SMTPUTF8` when :attr:`MailPayload.needs_smtputf8`), both with
        ``cte_type="7bit"``. Date and Message-ID are added unless the payload's headers
        give them.

    Raises:
        ValueError: ``message_id_domain`` is not a valid domain name.
    """
    policy = _POLICY_UTF8 if payload.needs_smtputf8 else _POLICY
    sender = parse_address("from_email", payload.from_email)
    try:
        id_domain = to_ascii_domain(message_id_domain or sender.domain)
    except ValueError as exc:
        raise ValueError(f"message_id_domain: {exc}") from None

    msg = EmailMessage(policy=policy)
    # Every field the caller fills is written by _wire, never parsed by the email
    # package (which would decode encoded-words in it): see _wire's docstring.
    _set(msg, "From", "from_email", VerbatimHeader.address_list("From", (sender,)))
    # Without To, some spam filters mark the message down: say that the list is hidden.
    if payload.to:
        _set(msg, "To", "to", _addresses("To", "to", payload.to))
    else:
        msg["To"] = VerbatimHeader("To", "undisclosed-recipients:;", addresses=())
    if payload.cc:
        _set(msg, "Cc", "cc", _addresses("Cc", "cc", payload.cc))
    if payload.reply_to:
        _set(msg, "Reply-To", "reply_to", _addresses("Reply-To", "reply_to", payload.reply_to))
    _set(msg, "Subject", "subject", VerbatimHeader.unstructured("Subject", payload.subject))
    date = payload.header("Date") or format_datetime(datetime.now().astimezone())
    _set(msg, "Date", "headers['Date']", VerbatimHeader.unstructured("Date", date))
    message_id = payload.header("Message-ID") or make_msgid(domain=id_domain)
    _set(msg, "Message-ID", "headers['Message-ID']", VerbatimHeader("Message-ID", message_id))
    if payload.list_unsubscribe:
        value = unsubscribe_value(payload.list_unsubscribe)
        _set(msg, LIST_UNSUBSCRIBE, "list_unsubscribe", VerbatimHeader(LIST_UNSUBSCRIBE, value))
    if payload.list_unsubscribe_post:
        header = VerbatimHeader(LIST_UNSUBSCRIBE_POST, ONE_CLICK)
        _set(msg, LIST_UNSUBSCRIBE_POST, "list_unsubscribe_post", header)
    for name, value in payload.headers:
        lower = name.lower()
        if lower in {"date", "message-id"}:
            continue
        where = f"headers[{name!r}]"
        if lower == "sender":
            header = _addresses(name, where, (value,))
        elif lower in _LITERAL:
            header = VerbatimHeader(name, value)  # checked URIs (or the one-click value)
        else:
            header = VerbatimHeader.unstructured(name, value)
        _set(msg, name, where, header)

    inline = [a for a in payload.attachments if a.content_id is not None]
    files = [a for a in payload.attachments if a.content_id is None]
    if payload.text is not None:
        _set_body(msg, payload.text, "plain")
        if payload.html is not None:
            msg.make_alternative()
            html_part = _new_part(policy)
            _fill_html(html_part, payload.html, inline, policy)
            msg.attach(html_part)
    else:
        assert payload.html is not None  # MailPayload requires text or html
        _fill_html(msg, payload.html, inline, policy)
    if files:
        msg.make_mixed()
        for attachment in files:
            msg.attach(_file_part(attachment, policy))
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    return msg


def message_bytes(msg: EmailMessage) -> bytes:
    """Serialise ``msg`` for DATA: CRLF line endings, 7-bit bodies (no 8BITMIME needed).

    Headers are ASCII unless the message was built for SMTPUTF8. Dot-stuffing is left to
    the SMTP layer. The header block written is parsed back and must hold exactly
    ``msg``'s fields with the same meaning.

    Raises:
        InvalidMessageError: a field would not come out as itself; the error names it.
    """
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    differs = header_mismatch(msg, data)
    if differs is not None:
        field = _FIELDS.get(differs.lower(), f"headers[{differs!r}]")
        fail(field, "cannot be written as the header field it asks for (header injection?)")
    return data


def pin_header(msg: EmailMessage, name: str, value: str) -> None:
    """Replace ``name`` (Date, Message-ID) with a value checked before, written as it is."""
    del msg[name]
    msg[name] = VerbatimHeader(name, value)


def _addresses(name: str, where: str, values: tuple[str, ...]) -> VerbatimHeader:
    parsed = tuple(parse_address(where, value) for value in values)
    return VerbatimHeader.address_list(name, parsed)


def _set(msg: EmailMessage, name: str, where: str, value: str) -> None:
    """Add a header field; whatever the email package cannot take is the field's fault."""
    try:
        msg[name] = value
    except (ValueError, TypeError, UnicodeError, IndexError) as exc:
        fail(where, f"cannot be written as a header field ({exc})")

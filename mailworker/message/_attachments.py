"""Attached files: the :class:`Attachment` type, its JSON form and its validation."""

from __future__ import annotations

import dataclasses
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from mailworker.message._fields import (
    check_fields,
    decode_base64,
    fail,
    header_text,
    optional_str,
    required_str,
    type_name,
)

_ATTACHMENT_FIELDS: Final = ("filename", "content", "mimetype", "content_id")
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,250}")
_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIMETYPE = re.compile(f"{_MIME_NAME}/{_MIME_NAME}")


@dataclass(frozen=True)
class Attachment:
    """One attached file. With ``content_id`` it is an inline part, shown by the HTML body
    where it says ``cid:<content_id>``.

    Attributes:
        filename: The file name shown to the recipient (no path).
        content: The file's bytes.
        mimetype: ``type/subtype``; guessed from ``filename`` when None.
        content_id: The id the HTML refers to (without angle brackets), or None.
    """

    filename: str
    content: bytes = field(repr=False)
    mimetype: str | None = None
    content_id: str | None = None

    def summary(self) -> dict[str, object]:
        """Name, type and size, never the content: JSON-safe, for logs."""
        return {
            "filename": self.filename,
            "mimetype": self.mimetype,
            "size": len(self.content),
            "content_id": self.content_id,
        }


def attachments_from_json(value: object) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        fail("attachments", f"must be a list of objects, got {type_name(value)}")
    attachments: list[Attachment] = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, Mapping):
            fail(where, f"must be an object with filename and content, got {type_name(item)}")
        check_fields(item, _ATTACHMENT_FIELDS, prefix=f"{where}.")
        attachments.append(
            Attachment(
                filename=required_str(f"{where}.filename", item.get("filename")),
                content=decode_base64(f"{where}.content", item.get("content")),
                mimetype=optional_str(f"{where}.mimetype", item.get("mimetype")),
                content_id=optional_str(f"{where}.content_id", item.get("content_id")),
            )
        )
    return tuple(attachments)


def _guess_mimetype(filename: str) -> str:
    guessed, encoding = mimetypes.guess_type(filename)
    # 'x.tar.gz' guesses as application/x-tar with encoding gzip: labelling the compressed
    # bytes as a tar would mislead the recipient's mail program. message/* and multipart/*
    # parts are parsed, not shown as files, so an '.eml' file also goes as bytes.
    if guessed is None or encoding is not None or guessed.startswith(("message/", "multipart/")):
        return "application/octet-stream"
    return guessed


def _check_attachment(where: str, attachment: Attachment) -> Attachment:
    if not isinstance(attachment, Attachment):
        fail(where, f"must be an Attachment, got {type_name(attachment)}")
    filename = header_text(f"{where}.filename", attachment.filename)
    if not filename.strip():
        fail(f"{where}.filename", "must not be empty")
    if "/" in filename or "\\" in filename or len(filename) > 255:
        fail(f"{where}.filename", "must be a file name of at most 255 characters, not a path")
    if not isinstance(attachment.content, bytes):
        fail(f"{where}.content", f"must be bytes, got {type_name(attachment.content)}")
    mimetype = header_text(f"{where}.mimetype", attachment.mimetype, required=False).lower()
    if not mimetype:
        mimetype = _guess_mimetype(filename)
    elif not _MIMETYPE.fullmatch(mimetype):
        fail(f"{where}.mimetype", f"{mimetype!r} is not a type/subtype such as 'image/png'")
    elif mimetype.startswith(("message/", "multipart/")):
        fail(f"{where}.mimetype", "message/* and multipart/* cannot be attached as bytes")
    content_id = attachment.content_id
    if content_id is not None:
        content_id = header_text(f"{where}.content_id", content_id).strip()
        if content_id.startswith("<") and content_id.endswith(">"):
            content_id = content_id[1:-1]
        if not _CONTENT_ID.fullmatch(content_id):
            fail(f"{where}.content_id", f"{content_id!r} is not an id such as 'logo@example'")
    return dataclasses.replace(
        attachment, filename=filename, mimetype=mimetype, content_id=content_id
    )


def check_attachments(value: object, has_html: bool) -> tuple[Attachment, ...]:
    """The checked attachments (their size counts in the whole message's limit)."""
    if not isinstance(value, tuple):
        fail("attachments", f"must be a tuple of Attachment, got {type_name(value)}")
    checked = tuple(_check_attachment(f"attachments[{i}]", a) for i, a in enumerate(value))
    content_ids: dict[str, int] = {}
    for i, attachment in enumerate(checked):
        if attachment.content_id is None:
            continue
        if not has_html:
            fail(f"attachments[{i}].content_id", "inline parts need an html body to show them")
        if attachment.content_id in content_ids:
            first = content_ids[attachment.content_id]
            fail(f"attachments[{i}].content_id", f"the same id as attachments[{first}]")
        content_ids[attachment.content_id] = i
    return checked

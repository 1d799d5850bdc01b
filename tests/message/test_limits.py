"""One size limit on the whole message, and a recipient cap, checked before anything
large is decoded or built."""

from __future__ import annotations

import base64
import tracemalloc
from typing import Any

import pytest

from mailworker.errors import InvalidMessageError
from mailworker.message import Limits, MailPayload, RawPayload

MIB = 1024 * 1024


def mail(limits: Limits, **fields: Any) -> MailPayload:
    """A send_mail payload validated under ``limits``."""
    kwargs: dict[str, Any] = {"to": "ann@example.org", "subject": "s", "text": "t", **fields}
    return MailPayload.from_task_kwargs(kwargs, default_from="shop@example.com", limits=limits)


class TestWholeMessage:
    """Bodies count as much as attachments."""

    def test_large_bodies_refused(self) -> None:
        """40 MiB of text plus 40 MiB of html is refused although it has no attachment."""
        with pytest.raises(InvalidMessageError) as caught:
            mail(Limits(), text="x" * (40 * MIB), html="y" * (40 * MIB))
        assert caught.value.field == "message"
        assert "25 MiB" not in str(caught.value)  # says bytes and the setting instead
        assert "MAILWORKER_MAX_MESSAGE_BYTES" in str(caught.value)

    def test_attachments_refused_before_decoding(self) -> None:
        """Attachments over the limit are refused from their encoded size: even content
        that is not base64 at all is never decoded (the size error comes first)."""
        files = [{"filename": f"{i}.bin", "content": "!" * 400} for i in range(4)]
        with pytest.raises(InvalidMessageError) as caught:
            mail(Limits(max_message_bytes=1000), attachments=files)
        assert caught.value.field == "message"

    def test_large_attachments_cost_no_decoded_copy(self) -> None:
        """Four 10 MiB attachments over a 25 MiB limit are refused without allocating
        their decoded bytes."""
        content = base64.b64encode(bytes(10 * MIB)).decode()
        files = [{"filename": f"{i}.bin", "content": content} for i in range(4)]
        tracemalloc.start()
        try:
            with pytest.raises(InvalidMessageError):
                mail(Limits(), attachments=files)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MIB

    def test_raw_message_refused_before_decoding(self) -> None:
        """A send_message payload over the limit is refused from its base64 length."""
        raw = base64.b64encode(b"Subject: x\r\n\r\n" + (b"x" * 98 + b"\r\n") * 20).decode()
        kwargs = {"raw_b64": raw, "envelope_from": "", "recipients": ["a@example.org"]}
        with pytest.raises(InvalidMessageError) as caught:
            RawPayload.from_task_kwargs(kwargs, limits=Limits(max_message_bytes=1000))
        assert caught.value.field == "raw_b64"
        assert RawPayload.from_task_kwargs(kwargs, limits=Limits(max_message_bytes=3000))


class TestRecipientCap:
    """Too many envelope recipients are refused, naming the fullest field."""

    def test_send_mail(self) -> None:
        """to, cc and bcc count together; the field with the most is named."""
        bcc = [f"u{i}@example.org" for i in range(3)]
        mail(Limits(max_recipients=4), bcc=bcc)
        with pytest.raises(InvalidMessageError) as caught:
            mail(Limits(max_recipients=3), cc="c@example.org", bcc=bcc)
        assert caught.value.field == "bcc"
        assert "MAILWORKER_MAX_RECIPIENTS" in str(caught.value)

    def test_send_message(self) -> None:
        """send_message's recipients are capped too."""
        raw = base64.b64encode(b"Subject: x\r\n\r\nx\r\n").decode()
        kwargs = {"raw_b64": raw, "envelope_from": "", "recipients": ["a@x.org", "b@x.org"]}
        with pytest.raises(InvalidMessageError) as caught:
            RawPayload.from_task_kwargs(kwargs, limits=Limits(max_recipients=1))
        assert caught.value.field == "recipients"

    def test_default_cap(self) -> None:
        """By default a message may have 1,000 recipients, not 1,001 (one is in to)."""
        many = [f"u{i}@example.org" for i in range(1000)]
        mail(Limits(), bcc=many[:999])
        with pytest.raises(InvalidMessageError):
            mail(Limits(), bcc=many)


class TestLineLength:
    """RFC 5322 2.1.1: no line of a message is longer than 998 octets."""

    def test_raw_message_with_an_overlong_line(self) -> None:
        """send_message refuses a prebuilt message with a 999-octet line, naming the
        line, instead of letting the server refuse it after DATA."""
        raw = base64.b64encode(b"Subject: x\r\n\r\nok\r\n" + b"y" * 999 + b"\r\n").decode()
        kwargs = {"raw_b64": raw, "envelope_from": "", "recipients": ["a@example.org"]}
        with pytest.raises(InvalidMessageError, match="line 4 is longer than 998"):
            RawPayload.from_task_kwargs(kwargs)
